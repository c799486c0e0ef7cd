//! `appevents demo`: the whole story on one machine. Defines the app event `Contact Created`,
//! a Salesforce and a HubSpot workflow, a user with a connection to each (pointing at the
//! stand-in CRM), switches both workflows on, publishes one event, and shows the contact
//! created in each CRM and the two runs recorded.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::broker::Recovery;
use crate::config::Settings;
use crate::connection::{self, NewConnection};
use crate::integrations::Provider;
use crate::payload_check::Mode;
use crate::publish::{EventPublisher, NewEvent};
use crate::run::{self, Run, RunFilter, RunStatus};
use crate::standin::Record;
use crate::vault::Keyring;
use crate::workflow::{self, NewWorkflow};
use crate::{app_event, db, standin, subscription, worker};

const EVENT: &str = "Contact Created";

pub async fn run(
    mut settings: Settings,
    standin_url: Option<String>,
    start_worker: bool,
) -> anyhow::Result<()> {
    db::ensure_database(&settings.database)
        .await
        .context("database")?;
    db::migrate(&settings.database)
        .await
        .context("migrations")?;
    let pool = db::pool(&settings.database)?;
    let keyring = Keyring::from_settings(&settings.secrets)?;

    let (standin_url, _local_standin) = match standin_url {
        Some(url) => (url.trim_end_matches('/').to_owned(), None),
        None => {
            let running = standin::spawn("127.0.0.1:0").await?;
            (running.url(), Some(running))
        }
    };
    println!("stand-in CRM      {standin_url} (plays Salesforce and HubSpot)");

    let example = json!({"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace", "company": "Analytical Engines"});
    let event = match app_event::get(&pool, EVENT).await {
        Ok(existing) => existing,
        Err(_) => app_event::create(&pool, EVENT, &example, Mode::Off).await?,
    };
    println!(
        "app event         {} (example payload {})",
        event.name, event.schema
    );

    let salesforce = ensure_workflow(
        &pool,
        "Contact to Salesforce",
        Provider::Salesforce,
        "create",
        json!({"sobject": "Contact"}),
        json!({"Email": "{{payload.email}}", "FirstName": "{{payload.first_name}}", "LastName": "{{payload.last_name}}", "Description": "Created by appevents from event {{id}}"}),
    )
    .await?;
    let hubspot = ensure_workflow(
        &pool,
        "Contact to HubSpot",
        Provider::Hubspot,
        "create-contact",
        json!({}),
        json!({"email": "{{payload.email}}", "firstname": "{{payload.first_name}}", "lastname": "{{payload.last_name}}", "company": "{{payload.company}}"}),
    )
    .await?;
    println!(
        "workflows         {} (Salesforce create Contact), {} (HubSpot create contact)",
        salesforce.name, hubspot.name
    );

    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let user = format!("demo-user-{tag}");
    let sf_connection = connection::create(
        &pool,
        &keyring,
        &new_connection(&user, Provider::Salesforce, &standin_url),
    )
    .await?;
    let hs_connection = connection::create(
        &pool,
        &keyring,
        &new_connection(&user, Provider::Hubspot, &standin_url),
    )
    .await?;
    subscription::create(&pool, &user, salesforce.id, sf_connection).await?;
    subscription::create(&pool, &user, hubspot.id, hs_connection).await?;
    println!("user              {user}: a connection to each CRM, both workflows switched on");

    let (stop, worker_task) = if start_worker {
        settings.worker.ops_listen = "127.0.0.1:0".to_owned();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(worker::run(
            settings.clone(),
            async move {
                let _ = stop_rx.await;
            },
            Some(started_tx),
        ));
        started_rx.await.context("the worker did not start")?;
        println!("worker            started in this process");
        (Some(stop_tx), Some(task))
    } else {
        println!("worker            using the workers already running");
        (None, None)
    };

    let email = format!("ada+{tag}@example.com");
    let publisher = EventPublisher::connect(&settings, Recovery::None)
        .await
        .context("broker")?;
    let event_id = publisher
        .publish(&NewEvent {
            id: None,
            name: EVENT.to_owned(),
            user_id: user.clone(),
            payload: json!({"email": email, "first_name": "Ada", "last_name": "Lovelace", "company": "Analytical Engines"}),
            occurred_at: None,
        })
        .await?;
    publisher.close().await;
    println!("published         event {event_id} ({EVENT}) for {user}, confirmed by the broker");

    let runs = wait_for_runs(&pool, &event_id, 2, Duration::from_secs(30)).await;
    if let (Some(stop), Some(task)) = (stop, worker_task) {
        let _ = stop.send(());
        let _ = task.await;
    }
    let runs = runs?;

    println!();
    let records = fetch_records(&standin_url).await?;
    for record in records.iter().filter(|r| mentions(r, &email)) {
        let crm = if record.provider == "salesforce" {
            "Salesforce"
        } else {
            "HubSpot"
        };
        println!(
            "{crm} {} {}: {}",
            singular(&record.object),
            record.id,
            Value::Object(record.fields.clone())
        );
    }
    println!();
    println!("runs of event {event_id}:");
    for run in &runs {
        println!(
            "  {:<22} {:<10} attempts {}  provider id {}",
            run.workflow,
            run.status.as_str(),
            run.attempts,
            run.provider_id.as_deref().unwrap_or("-")
        );
    }
    let succeeded = runs
        .iter()
        .filter(|r| r.status == RunStatus::Succeeded)
        .count();
    if succeeded != 2 {
        bail!("expected 2 succeeded runs, found {succeeded}");
    }
    println!();
    println!("One event became a contact in each CRM, and two succeeded runs are recorded.");
    Ok(())
}

async fn ensure_workflow(
    pool: &deadpool_postgres::Pool,
    name: &str,
    provider: Provider,
    action: &str,
    options: Value,
    mapping: Value,
) -> anyhow::Result<workflow::Workflow> {
    let existing = workflow::list(pool, Some(EVENT)).await?;
    if let Some(found) = existing
        .into_iter()
        .find(|w| w.name == name && w.provider == provider)
    {
        return Ok(found);
    }
    Ok(workflow::create(
        pool,
        &NewWorkflow {
            name: name.to_owned(),
            event: EVENT.to_owned(),
            provider,
            action: action.to_owned(),
            options,
            mapping,
        },
    )
    .await?)
}

fn new_connection(user: &str, provider: Provider, standin_url: &str) -> NewConnection {
    NewConnection {
        user_id: user.to_owned(),
        provider,
        base_url: standin_url.to_owned(),
        settings: json!({}),
        access_token: Some(SecretString::from(format!("demo-token-{provider}"))),
        refresh_token: None,
        token_url: None,
        client_id: None,
        client_secret: None,
    }
}

/// Waits until `expected` runs of the event are finished (succeeded or dead), or the deadline.
async fn wait_for_runs(
    pool: &deadpool_postgres::Pool,
    event_id: &str,
    expected: usize,
    within: Duration,
) -> anyhow::Result<Vec<Run>> {
    let deadline = Instant::now() + within;
    let filter = RunFilter {
        event_id: Some(event_id.to_owned()),
        limit: 100,
        ..RunFilter::default()
    };
    loop {
        let runs = run::list(pool, &filter).await?;
        let finished = runs
            .iter()
            .filter(|r| matches!(r.status, RunStatus::Succeeded | RunStatus::Dead))
            .count();
        if finished >= expected {
            return Ok(runs);
        }
        if Instant::now() > deadline {
            bail!(
                "only {finished} of {expected} runs finished within {within:?}; is a worker running?"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fetch_records(standin_url: &str) -> anyhow::Result<Vec<Record>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let records = reqwest::Client::new()
        .get(format!("{standin_url}/_standin/records"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(records)
}

fn mentions(record: &Record, email: &str) -> bool {
    record.fields.values().any(|v| v.as_str() == Some(email))
}

fn singular(object: &str) -> &str {
    match object {
        "contacts" => "contact",
        other => other,
    }
}
