//! `appevents workflow`: workflows, and `workflow test`, the dry run.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use uuid::Uuid;

use super::output::{json_arg, print_json, print_table};
use super::workflow_files::{self as files, ApplyArgs, ExportArgs};
use crate::catalog::workflows::{self, NewWorkflow, StepDefinition, WorkflowChanges};
use crate::config::Settings;
use crate::core::provider::Provider;
use crate::integrations::Integrations;
use crate::pipeline::dry_run;
use crate::store::{db, vault};

#[derive(Debug, Subcommand)]
pub(super) enum WorkflowCommand {
    /// Create a workflow. Prints the id.
    Create(WorkflowArgs),
    /// Workflows: id, name, app event, provider and action.
    List {
        /// Only the workflows of this app event (name or id).
        #[arg(long)]
        event: Option<String>,
        /// Only the workflow of this name (names are unique, ignoring case).
        #[arg(long)]
        name: Option<String>,
        /// Print only the ids, one a line (for scripts: `SF=$(appevents workflow list --name … --ids)`).
        #[arg(long, conflicts_with = "json")]
        ids: bool,
        #[arg(long)]
        json: bool,
    },
    Update {
        id: Uuid,
        /// New name (unique, ignoring case).
        #[arg(long)]
        name: Option<String>,
        /// Another app event to trigger it (name or id).
        #[arg(long)]
        event: Option<String>,
        /// Another action of the same provider (a one-step workflow).
        #[arg(long)]
        action: Option<String>,
        /// New field mapping: JSON, or @FILE (a one-step workflow).
        #[arg(long, value_name = "JSON|@FILE")]
        mapping: Option<String>,
        #[command(flatten)]
        options: StepOptions,
        /// A new condition (CEL) on the event; the workflow runs only when it holds.
        #[arg(long, value_name = "CEL", conflicts_with = "no_when")]
        when: Option<String>,
        /// Remove the workflow's condition.
        #[arg(long)]
        no_when: bool,
        /// New steps, replacing all: a JSON array, or @FILE (see docs/workflows.md).
        #[arg(long, value_name = "JSON|@FILE", conflicts_with_all = ["action", "mapping"])]
        steps: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a workflow with its subscriptions and run history.
    Delete { id: Uuid },
    /// Dry run: print the request the worker would send for an event made from the app
    /// event's example payload, secrets masked. Sends nothing unless --send.
    Test(WorkflowTestArgs),
    /// Create or update workflows from files (YAML or JSON), keyed by each file's `key`;
    /// idempotent. See docs/workflows.md.
    Apply(ApplyArgs),
    /// Write the workflows that have a key as files that `apply` reads.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub(super) struct WorkflowTestArgs {
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
    /// the response status and provider id, or the classified failure. For a workflow of
    /// several steps, every step in order.
    #[arg(long, conflicts_with = "send_reads")]
    send: bool,
    /// For a workflow of several steps: send the read-only steps (query, search, HTTP GET)
    /// so later steps render with their real outputs; writes are shown, not sent.
    #[arg(long)]
    send_reads: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(super) struct WorkflowArgs {
    /// The workflow's name, unique ignoring case.
    #[arg(long)]
    name: String,
    /// The app event that triggers it (name or id).
    #[arg(long)]
    event: String,
    /// salesforce, hubspot or http.
    #[arg(long)]
    provider: Provider,
    /// salesforce: create | upsert; hubspot: create-contact | upsert-contact; http: request.
    #[arg(long, required_unless_present = "steps")]
    action: Option<String>,
    /// Field mapping template: JSON, or @FILE.
    #[arg(long, value_name = "JSON|@FILE", required_unless_present = "steps")]
    mapping: Option<String>,
    #[command(flatten)]
    options: StepOptions,
    /// A condition (CEL) on the event: the workflow runs only when it holds, e.g.
    /// 'payload.plan == "pro"'.
    #[arg(long, value_name = "CEL")]
    when: Option<String>,
    /// The steps, instead of --action and --mapping: a JSON array of
    /// {name, action, options, mapping, when, for_each, on_error}, or @FILE.
    #[arg(long, value_name = "JSON|@FILE", conflicts_with_all = ["action", "mapping"])]
    steps: Option<String>,
    #[arg(long)]
    json: bool,
}

/// `--steps`: a JSON array of step definitions.
fn steps_arg(text: &str) -> anyhow::Result<Vec<StepDefinition>> {
    let value = json_arg(text, "--steps")?;
    serde_json::from_value(value).context("--steps must be a JSON array of steps")
}

/// The step's options, as flags or as one JSON object.
#[derive(Debug, Args, Default)]
pub(super) struct StepOptions {
    /// All options as a JSON object (or @FILE); the flags below override its keys.
    #[arg(long, value_name = "JSON|@FILE")]
    options: Option<String>,
    /// Salesforce: the sObject (default Contact).
    #[arg(long)]
    sobject: Option<String>,
    /// Salesforce upsert: the external id field.
    #[arg(long)]
    external_id_field: Option<String>,
    /// Salesforce create: a mapped field that identifies the record (looked up before a run
    /// that may have created it already runs again); repeatable.
    #[arg(long = "match-field", value_name = "FIELD")]
    match_fields: Vec<String>,
    /// HubSpot upsert: the property that identifies a contact (default email).
    #[arg(long)]
    id_property: Option<String>,
    /// HubSpot create-company: the mapped property that identifies a company, searched for
    /// before a run that may have created it already runs again (default domain, when mapped).
    #[arg(long)]
    match_property: Option<String>,
    /// HTTP: method (default POST).
    #[arg(long)]
    method: Option<String>,
    /// HTTP: URL template, absolute or relative to the connection's base URL (absolute in a
    /// Salesforce or HubSpot workflow's http.request).
    #[arg(long)]
    url: Option<String>,
    /// HTTP: a header as NAME:VALUE (value may reference the event); repeatable.
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
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
            ("match_property", &self.match_property),
            ("method", &self.method),
            ("url", &self.url),
        ];
        for (key, value) in flags {
            if let Some(value) = value {
                options.insert(key.to_owned(), json!(value));
            }
        }
        if !self.match_fields.is_empty() {
            options.insert("match_fields".to_owned(), json!(self.match_fields));
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

pub(super) async fn run(settings: &Settings, command: WorkflowCommand) -> anyhow::Result<()> {
    let pool = &db::pool(&settings.database)?;
    match command {
        WorkflowCommand::Create(args) => {
            let steps = args.steps.as_deref().map(steps_arg).transpose()?;
            let options = args.options.to_value()?;
            if steps.is_some() && options.is_some() {
                bail!("--steps carries each step's options: give no option flags with it");
            }
            let new = NewWorkflow {
                name: args.name,
                event: args.event,
                provider: args.provider,
                action: args.action.unwrap_or_default(),
                options: options.unwrap_or_else(|| json!({})),
                mapping: match &args.mapping {
                    Some(mapping) => json_arg(mapping, "--mapping")?,
                    None => json!({}),
                },
                when: args.when,
                steps: steps.unwrap_or_default(),
            };
            let created = workflows::create(pool, &new).await?;
            if args.json {
                return print_json(&created);
            }
            println!("{}", created.id);
        }
        WorkflowCommand::List {
            event,
            name,
            ids,
            json,
        } => {
            let list = workflows::list(pool, event.as_deref(), name.as_deref()).await?;
            if json {
                return print_json(&list);
            }
            if ids {
                for workflow in &list {
                    println!("{}", workflow.id);
                }
                return Ok(());
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
            when,
            no_when,
            steps,
            json,
        } => {
            let changes = WorkflowChanges {
                name,
                event,
                action,
                options: options.to_value()?,
                mapping: mapping.map(|m| json_arg(&m, "--mapping")).transpose()?,
                when: if no_when { Some(None) } else { when.map(Some) },
                steps: steps.as_deref().map(steps_arg).transpose()?,
            };
            if changes.is_empty() {
                bail!(
                    "nothing to update: give --name, --event, --action, an option, --mapping, --when, --no-when or --steps"
                );
            }
            let updated = workflows::update(pool, id, &changes).await?;
            if json {
                return print_json(&updated);
            }
            println!("{}", updated.id);
        }
        WorkflowCommand::Delete { id } => {
            workflows::delete(pool, id).await?;
            println!("deleted");
        }
        WorkflowCommand::Test(args) => test(settings, args).await?,
        WorkflowCommand::Apply(args) => files::apply(settings, args).await?,
        WorkflowCommand::Export(args) => files::export(settings, args).await?,
    }
    Ok(())
}

/// `workflow test`: the dry run, and with `--send` one real call.
async fn test(settings: &Settings, args: WorkflowTestArgs) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let keyring = vault::Keyring::from_settings(&settings.secrets)?;
    let integrations = Integrations::new(&settings.http, &settings.salesforce)?;
    let spec = dry_run::Spec {
        workflow: args.workflow,
        user: args.user,
        connection: args.connection,
        payload: args
            .payload
            .map(|p| json_arg(&p, "--payload"))
            .transpose()?,
    };
    if !dry_run::is_one_step(&pool, spec.workflow).await? {
        let sending = match (args.send, args.send_reads) {
            (true, _) => dry_run::Sending::Everything,
            (false, true) => dry_run::Sending::Reads,
            (false, false) => dry_run::Sending::Nothing,
        };
        let test = dry_run::chain(&pool, &keyring, &integrations, &spec, sending).await?;
        if args.json {
            print_json(&test.to_json())?;
        } else {
            println!("{}", test.to_text());
            if sending == dry_run::Sending::Nothing {
                println!();
                println!(
                    "dry run: nothing was sent (--send-reads sends the reads, --send every step)"
                );
            }
        }
        if test.failed() {
            bail!("a step failed or its condition could not be evaluated; see above");
        }
        return Ok(());
    }
    if args.send_reads {
        bail!("--send-reads is for workflows of several steps; this one has one: use --send");
    }
    let test = dry_run::prepare(&pool, &keyring, &integrations, &spec).await?;
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
