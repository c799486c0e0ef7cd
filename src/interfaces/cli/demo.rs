//! `appevents demo`: the whole story on one machine. Defines the app event `Contact Created`,
//! a Salesforce and a HubSpot workflow, connects a user's account at each CRM (the stand-in)
//! through the Connect Portal's OAuth flow — authorize with PKCE, approved at the stand-in's
//! page as a person would, code exchanged, account identified — switches both workflows on,
//! publishes one event, and shows the contact created in each CRM and the two runs recorded.
//!
//! Without `--standin`, the stand-in CRM runs as a child process: the `appevents-standin`
//! binary beside this one (its own crate, so the product does not ship it). Started by
//! `cargo run`, the demo has cargo build it first, so `cargo run -- demo` works from a fresh
//! clone.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::catalog::connect::{Callback, Caller, Connected, Connector};
use crate::catalog::workflows::{self, NewWorkflow};
use crate::catalog::{app_events, subscriptions};
use crate::config::{OAuthApp, Settings};
use crate::core::payload_check::Mode;
use crate::core::provider::Provider;
use crate::interfaces::worker;
use crate::pipeline::runs::{self, Run, RunFilter, RunStatus};
use crate::store::vault::Keyring;
use crate::store::{db, sessions};
use crate::transport::broker::{self, Recovery};
use crate::transport::publish::{EventPublisher, NewEvent};

const EVENT: &str = "Contact Created";

#[derive(Debug, Args)]
pub(super) struct DemoArgs {
    /// Use this running stand-in CRM instead of starting one (the appevents-standin binary).
    #[arg(long, value_name = "URL")]
    standin: Option<String>,
    /// Rely on workers already running instead of starting one in this process.
    #[arg(long)]
    no_worker: bool,
}

pub(super) async fn run(mut settings: Settings, args: DemoArgs) -> anyhow::Result<()> {
    let (standin_url, start_worker) = (args.standin, !args.no_worker);
    db::ensure_database(&settings.database)
        .await
        .context("database")?;
    db::migrate(&settings.database)
        .await
        .context("migrations")?;
    super::migrate::declare_topology(&settings).await?;
    let pool = db::pool(&settings.database)?;
    let keyring = Keyring::from_settings(&settings.secrets)?;

    // The child process, if any, is killed when this is dropped.
    let (standin_url, _local_standin) = match standin_url {
        Some(url) => (url.trim_end_matches('/').to_owned(), None),
        None => {
            let (url, child) = start_standin().await?;
            (url, Some(child))
        }
    };
    println!("stand-in CRM      {standin_url} (plays Salesforce and HubSpot)");

    // The README's story publishes events of this shape: with `--payload-check reject` they
    // must match it (the demo's own event adds a company, which the check allows).
    let example = json!({"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"});
    let event = match app_events::get(&pool, EVENT).await {
        Ok(existing) => existing,
        Err(_) => app_events::create(&pool, EVENT, &example, Mode::Off).await?,
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
        json!({"sobject": "Contact", "match_fields": ["Email"]}),
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
    let connector = Connector::from_settings(
        &standin_oauth(&settings, &standin_url),
        pool.clone(),
        Arc::new(keyring),
    )?;
    let session = sessions::open(&pool, "portal", &user, None, Duration::from_secs(600)).await?;
    let caller = Caller {
        user: &user,
        session_digest: &session.session.digest,
    };
    let mut connected = Vec::new();
    for provider in [Provider::Salesforce, Provider::Hubspot] {
        let account = connect_through_oauth(&connector, &caller, provider).await?;
        println!(
            "connected         {provider} as {} (authorize, approved at the stand-in, code exchanged{})",
            account.account.label,
            if provider == Provider::Salesforce {
                " with PKCE"
            } else {
                ""
            }
        );
        connected.push(account.connection_id);
    }
    subscriptions::create(&pool, &user, salesforce.id, connected[0]).await?;
    subscriptions::create(&pool, &user, hubspot.id, connected[1]).await?;
    println!("user              {user}: both workflows switched on");

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
        .map_err(|err| anyhow::anyhow!(broker::connect_failure(settings.amqp_url(), &err)))?;
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
    println!(
        "To connect an account in the Connect Portal yourself, in a browser: docs/connect.md."
    );
    Ok(())
}

async fn ensure_workflow(
    pool: &deadpool_postgres::Pool,
    name: &str,
    provider: Provider,
    action: &str,
    options: Value,
    mapping: Value,
) -> anyhow::Result<workflows::Workflow> {
    let existing = workflows::list(pool, Some(EVENT), None).await?;
    if let Some(found) = existing
        .into_iter()
        .find(|w| w.name == name && w.provider == provider)
    {
        return Ok(found);
    }
    Ok(workflows::create(
        pool,
        &NewWorkflow {
            name: name.to_owned(),
            event: EVENT.to_owned(),
            provider,
            action: action.to_owned(),
            options,
            mapping,
            when: None,
            steps: Vec::new(),
        },
    )
    .await?)
}

/// The settings with the OAuth apps the stand-in knows from the start, pointed at it.
fn standin_oauth(settings: &Settings, standin_url: &str) -> Settings {
    let mut settings = settings.clone();
    let app = |provider: &str| OAuthApp {
        client_id: format!("standin-{provider}-app"),
        client_secret: SecretString::from(format!("standin-{provider}-secret")),
        scopes: vec!["api".into(), "refresh_token".into(), "id".into()],
        redirect_url: format!("http://127.0.0.1:8080/portal/oauth/{provider}/callback"),
        pkce: provider == "salesforce",
    };
    settings.oauth.salesforce.app = app("salesforce");
    settings.oauth.salesforce.login_url = standin_url.to_owned();
    settings.oauth.hubspot.app = app("hubspot");
    settings.oauth.hubspot.authorize_url = format!("{standin_url}/oauth/authorize");
    settings.oauth.hubspot.api_url = standin_url.to_owned();
    settings
}

/// The Connect Portal's flow without a browser: start the authorization, approve at the
/// stand-in's authorize page (the form a person submits), and hand the redirect back to the
/// callback's own code.
async fn connect_through_oauth(
    connector: &Connector,
    caller: &Caller<'_>,
    provider: Provider,
) -> anyhow::Result<Connected> {
    let authorize = connector.begin(caller, provider).await?;
    let url = reqwest::Url::parse(&authorize)?;
    let mut form: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    form.push(("decision".into(), "approve".into()));
    form.push(("login".into(), format!("ada@{provider}.example")));
    let page = format!("{}{}", url.origin().ascii_serialization(), url.path());
    let approved = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?
        .post(page)
        .form(&form)
        .send()
        .await?;
    let back = approved
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .context("the stand-in did not redirect back after approval")?;
    let back = reqwest::Url::parse(back)?;
    let param = |name: &str| {
        back.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let callback = Callback {
        state: param("state"),
        code: param("code"),
        error: param("error"),
        error_description: param("error_description"),
    };
    Ok(connector.finish(caller, provider, &callback).await?)
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
        before: None,
        limit: 100,
        ..RunFilter::default()
    };
    loop {
        let runs = runs::list(pool, &filter).await?;
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

/// A record as the stand-in CRM lists it (`GET /_standin/records`).
#[derive(Deserialize)]
struct Record {
    provider: String,
    object: String,
    id: String,
    fields: Map<String, Value>,
}

async fn fetch_records(standin_url: &str) -> anyhow::Result<Vec<Record>> {
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

/// Starts `appevents-standin` on a free port; returns its URL (from the line it prints
/// once listening) and the child process, killed when dropped.
async fn start_standin() -> anyhow::Result<(String, Child)> {
    let binary = standin_binary().await?;
    let mut child = Command::new(&binary)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let stdout = child.stdout.take().context("the stand-in's output")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("the stand-in CRM did not start within 10s")??
        .unwrap_or_default();
    let Some(url) = line.strip_prefix("stand-in CRM listening on ") else {
        bail!("the stand-in CRM did not start: {line:?}");
    };
    Ok((url.trim().to_owned(), child))
}

/// `appevents-standin` beside this executable. Under `cargo run` (which sets `CARGO` and
/// `CARGO_MANIFEST_DIR`) it is built first with the same profile, since `cargo run` builds
/// only the binary it runs.
async fn standin_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("this executable's path")?;
    let dir = exe.parent().context("this executable's directory")?;
    let binary = dir.join(format!("appevents-standin{}", std::env::consts::EXE_SUFFIX));
    if let (Ok(cargo), Ok(manifest_dir)) =
        (std::env::var("CARGO"), std::env::var("CARGO_MANIFEST_DIR"))
    {
        build_standin(&cargo, Path::new(&manifest_dir), dir).await?;
    }
    if !binary.exists() {
        bail!(
            "no stand-in CRM: {} is missing; build it (cargo build -p appevents-standin) or give --standin URL",
            binary.display()
        );
    }
    Ok(binary)
}

async fn build_standin(cargo: &str, manifest_dir: &Path, profile_dir: &Path) -> anyhow::Result<()> {
    // target/debug holds the `dev` profile's output; any other directory is named after
    // its profile (target/release).
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--profile",
            profile,
            "--bin",
            "appevents-standin",
        ])
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .status()
        .await
        .context("cannot run cargo to build the stand-in CRM")?;
    if !status.success() {
        bail!("building the stand-in CRM failed ({status})");
    }
    Ok(())
}
