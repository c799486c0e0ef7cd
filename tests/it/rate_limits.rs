//! Per-account rate limits across the fleet, fairness between accounts in a worker, and
//! Salesforce's daily budget, against the stand-in CRM limiting each account as HubSpot
//! does and reporting Salesforce's usage.

use std::time::{Duration, Instant};

use appevents::catalog::connections;
use appevents::config::Settings;
use appevents::core::provider::Provider;
use appevents::interfaces::worker;
use appevents::pipeline::context::Context;
use appevents::pipeline::runs::{Run, RunStatus};
use appevents::transport::publish::NewEvent;
use appevents_standin::limits::{HubspotLimit, LimitSettings, SalesforceUsage};
use appevents_standin::{self as standin};
use serde_json::json;
use std::sync::Arc;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::cli;
use crate::support::{CONTACT_CREATED, ServerHandle, TestApp, eventually};

/// Another worker process's loop, in this process, on the same queue and database.
struct ExtraWorker {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    context: Arc<Context>,
}

impl ExtraWorker {
    async fn start(settings: &Settings) -> ExtraWorker {
        let (stop, stopped) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(worker::run(
            settings.clone(),
            async move {
                let _ = stopped.await;
            },
            Some(started_tx),
        ));
        let running = started_rx.await.expect("worker started");
        ExtraWorker {
            stop,
            task,
            context: running.context,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

fn succeeded_runs(context: &Context) -> i64 {
    let text = context.metrics.render();
    text.lines()
        .filter(|l| l.starts_with("appevents_runs_total{") && l.contains("outcome=\"succeeded\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as i64)
        .sum()
}

/// A metric's value summed over the series whose line contains every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn publish_many(app: &TestApp, user: &str, n: usize) -> Vec<String> {
    let publisher = app.publisher().await;
    let mut ids = Vec::new();
    for i in 0..n {
        let id = publisher
            .publish(&NewEvent {
                id: None,
                name: CONTACT_CREATED.to_owned(),
                user_id: user.to_owned(),
                payload: json!({"email": format!("{user}-{i}@example.com"), "first_name": "A", "last_name": "B"}),
                occurred_at: None,
            })
            .await
            .expect("publish");
        ids.push(id);
    }
    publisher.close().await;
    ids
}

async fn runs_of(app: &TestApp, user: &str) -> Vec<Run> {
    app.all_runs()
        .await
        .into_iter()
        .filter(|r| r.user_id == user)
        .collect()
}

async fn wait_succeeded(app: &TestApp, user: &str, n: usize, within: Duration) -> Vec<Run> {
    let done = eventually(within, || async {
        runs_of(app, user)
            .await
            .iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .count()
            >= n
    })
    .await;
    let runs = runs_of(app, user).await;
    assert!(
        done,
        "expected {n} succeeded runs of {user}, have {runs:#?}"
    );
    runs
}

/// A Salesforce create-contact workflow on `Contact Created` (which must exist), switched
/// on for user "u" against `crm`. Returns the connection's id.
async fn salesforce_workflow(app: &TestApp, crm: &standin::Running) -> Uuid {
    let workflow = app
        .workflow(
            "sf",
            CONTACT_CREATED,
            Provider::Salesforce,
            "create",
            json!({}),
            json!({"Email": "{{payload.email}}", "LastName": "{{payload.last_name}}"}),
        )
        .await;
    let conn = app
        .connection("u", Provider::Salesforce, &crm.url(), "token")
        .await;
    app.subscribe("u", workflow.id, conn).await;
    conn
}

async fn hubspot_connection_of(app: &TestApp, user: &str) -> Uuid {
    connections::list(&app.pool, Some(user))
        .await
        .expect("list")[0]
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_hold_one_hubspot_account_to_its_limit() {
    // Arrange: the account allows 20 calls per rolling second; three workers of 16 slots
    // each would send far more at once.
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    crm.standin.set_limits(LimitSettings {
        hubspot: Some(HubspotLimit {
            max: 20,
            interval_ms: 1000,
        }),
        ..LimitSettings::default()
    });
    let mut app = TestApp::with_settings(|s| {
        s.rate_limits.hubspot = "20/1s".into();
        // One record per call: the limit is counted in calls (batches: tests/it/batching.rs).
        s.batching.enabled = false;
    })
    .await;
    app.hubspot_workflow(&crm.url()).await;
    let events = 80;
    publish_many(&app, "u", events).await;

    // Act
    app.start_worker().await;
    let others = [
        ExtraWorker::start(&app.settings).await,
        ExtraWorker::start(&app.settings).await,
    ];
    let runs = wait_succeeded(&app, "u", events, Duration::from_secs(40)).await;

    // Assert: every event made once, in one call each, and the account never refused one
    // for its limit (the issue allows 1 %).
    let refused = crm.standin.refused_for_limit();
    let calls = crm.standin.requests().len() as u64;
    assert!(
        refused * 100 <= calls,
        "{refused} of {calls} calls were refused for the account's limit"
    );
    assert!(runs.iter().all(|r| r.attempts == 1), "{runs:#?}");
    assert_eq!(crm.standin.records().len(), events);
    let ran_by: Vec<i64> = std::iter::once(succeeded_runs(&app.worker().context))
        .chain(others.iter().map(|w| succeeded_runs(&w.context)))
        .collect();
    assert!(
        ran_by.iter().filter(|n| **n > 0).count() >= 2,
        "the fleet shared the work: {ran_by:?}"
    );
    for other in others {
        other.stop().await;
    }
    app.cleanup().await;
}

#[tokio::test]
async fn hubspot_s_limit_is_learned_from_its_headers_and_shown() {
    // Arrange: configured far above what the account really allows.
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    crm.standin.set_limits(LimitSettings {
        hubspot: Some(HubspotLimit {
            max: 10,
            interval_ms: 1000,
        }),
        ..LimitSettings::default()
    });
    let mut app = TestApp::with_settings(|s| s.rate_limits.hubspot = "1000/1s".into()).await;
    app.hubspot_workflow(&crm.url()).await;
    app.start_worker().await;
    publish_many(&app, "u", 1).await;
    wait_succeeded(&app, "u", 1, Duration::from_secs(10)).await;
    let learned = eventually(Duration::from_secs(5), || async {
        connections::list(&app.pool, Some("u")).await.expect("list")[0]
            .learned_rate_limit
            .as_deref()
            == Some("10/1s")
    })
    .await;
    assert!(learned, "the account's limit is stored for the fleet");

    // Act: a burst three times the account's limit.
    let ids = publish_many(&app, "u", 30).await;

    // Assert
    wait_succeeded(&app, "u", ids.len() + 1, Duration::from_secs(30)).await;
    assert_eq!(crm.standin.refused_for_limit(), 0);
    let listed = cli::ok(&app, &["connection", "list", "--user", "u"]).await;
    assert!(listed.contains("10/1s (learned)"), "{listed}");
    assert!(
        listed.contains(" left"),
        "HubSpot's remaining budget is shown: {listed}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_throttled_run_is_deferred_through_the_broker_without_spending_its_retries() {
    // Arrange: the connection's own limit lets one call through every two seconds; a run
    // may wait 300 ms in process, and has two broker retries (200 ms, 400 ms).
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::with_settings(|s| {
        // One record per call: this is about single runs (batches: tests/it/batching.rs).
        s.batching.enabled = false;
        s.rate_limits.max_wait = Duration::from_millis(300);
    })
    .await;
    app.hubspot_workflow(&crm.url()).await;
    let connection = hubspot_connection_of(&app, "u").await;
    connections::set_rate_limit(
        &app.pool,
        connection,
        None,
        Some("1/2s".parse().expect("limit")),
    )
    .await
    .expect("limit");
    app.start_worker().await;

    // Act
    publish_many(&app, "u", 4).await;

    // Assert: each run was deferred more often than it has retries, and still succeeded in
    // one call, with nothing dead-lettered.
    let runs = wait_succeeded(&app, "u", 4, Duration::from_secs(30)).await;
    assert!(
        runs.iter()
            .all(|r| r.attempts == 1 && r.last_error.is_none()),
        "{runs:#?}"
    );
    assert!(app.take_dead_letters().await.is_empty());
    let metrics = app.metrics().await;
    let deferred = metric(
        &metrics,
        "appevents_throttled_runs_total",
        &["reason=\"budget\""],
    );
    assert!(
        deferred >= 3.0,
        "runs deferred for budget: {deferred}\n{metrics}"
    );
    assert_eq!(crm.standin.records().len(), 4);
    app.cleanup().await;
}

#[tokio::test]
async fn a_salesforce_org_near_its_daily_limit_is_slowed_then_deferred() {
    // Arrange: the org has used 85 of its 100 daily calls.
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    crm.standin.set_limits(LimitSettings {
        salesforce: Some(SalesforceUsage { used: 85, max: 100 }),
        ..LimitSettings::default()
    });
    let mut app = TestApp::with_settings(|s| {
        // One record per call: this is about single runs (batches: tests/it/batching.rs).
        s.batching.enabled = false;
        s.rate_limits.salesforce_slow_interval = Duration::from_millis(700);
        s.rate_limits.salesforce_defer_for = Duration::from_secs(2);
        s.rate_limits.max_wait = Duration::from_secs(5);
    })
    .await;
    app.app_event(CONTACT_CREATED).await;
    let conn = salesforce_workflow(&app, &crm).await;
    app.start_worker().await;
    publish_many(&app, "u", 1).await;
    wait_succeeded(&app, "u", 1, Duration::from_secs(10)).await;

    // Act 1: above 80 % of the day, the org's calls are spaced.
    let started = Instant::now();
    let ids = publish_many(&app, "u", 3).await;
    wait_succeeded(&app, "u", 1 + ids.len(), Duration::from_secs(20)).await;

    // Assert 1
    assert!(
        started.elapsed() >= Duration::from_millis(1300),
        "three calls spaced by 700 ms took {:?}",
        started.elapsed()
    );
    let metrics = app.metrics().await;
    let usage = metric(
        &metrics,
        "appevents_salesforce_api_usage_ratio",
        &[&conn.to_string()],
    );
    assert!(usage >= 0.89, "usage ratio {usage}\n{metrics}");
    let listed = connections::list(&app.pool, Some("u")).await.expect("list");
    assert!(
        listed[0]
            .api_usage
            .as_deref()
            .is_some_and(|u| u.ends_with("/100")),
        "{:?}",
        listed[0].api_usage
    );

    // Act 2: above 95 %, the org's runs are deferred until the usage is read again.
    crm.standin.set_limits(LimitSettings {
        salesforce: Some(SalesforceUsage { used: 96, max: 100 }),
        ..LimitSettings::default()
    });
    publish_many(&app, "u", 1).await;
    wait_succeeded(&app, "u", 5, Duration::from_secs(20)).await;
    let ids = publish_many(&app, "u", 2).await;

    // Assert 2: deferred, then through after salesforce_defer_for, in one call each.
    let runs = wait_succeeded(&app, "u", 5 + ids.len(), Duration::from_secs(20)).await;
    let deferred = metric(
        &app.metrics().await,
        "appevents_throttled_runs_total",
        &["reason=\"salesforce_daily\""],
    );
    assert!(
        deferred >= 1.0,
        "runs deferred for the daily budget: {deferred}"
    );
    assert!(runs.iter().all(|r| r.attempts == 1), "{runs:#?}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_quiet_user_s_events_flow_while_a_throttled_account_s_backlog_waits() {
    // Arrange: a worker of 4 slots; the noisy account allows one call a second, and has 20
    // events queued ahead of the quiet user's 4.
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::with_settings(|s| {
        // One record per call: this is about single runs (batches: tests/it/batching.rs).
        s.batching.enabled = false;
        s.worker.concurrency = 4;
        s.rate_limits.in_flight_per_connection = 1;
        s.rate_limits.max_wait = Duration::from_secs(3);
    })
    .await;
    let workflow = app.hubspot_workflow(&crm.url()).await;
    let noisy = hubspot_connection_of(&app, "u").await;
    connections::set_rate_limit(&app.pool, noisy, None, Some("1/1s".parse().expect("limit")))
        .await
        .expect("limit");
    let quiet = app
        .connection("quiet", Provider::Hubspot, &crm.url(), "quiet-token")
        .await;
    app.subscribe("quiet", workflow, quiet).await;
    publish_many(&app, "u", 20).await;
    publish_many(&app, "quiet", 4).await;

    // Act
    app.start_worker().await;

    // Assert: the quiet user's events are done long before the noisy backlog is.
    wait_succeeded(&app, "quiet", 4, Duration::from_secs(5)).await;
    let noisy_done = runs_of(&app, "u")
        .await
        .iter()
        .filter(|r| r.status == RunStatus::Succeeded)
        .count();
    assert!(
        noisy_done < 20,
        "the noisy backlog is still waiting: {noisy_done} done"
    );
    let metrics = app.metrics().await;
    assert!(
        metric(
            &metrics,
            "appevents_throttled_runs_total",
            &["reason=\"in_flight\""]
        ) >= 1.0,
        "{metrics}"
    );
    let noisy_runs = runs_of(&app, "u").await;
    assert!(
        noisy_runs.iter().all(|r| r.status != RunStatus::Dead),
        "{noisy_runs:#?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn malformed_limit_headers_are_ignored() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    crm.standin.set_limits(LimitSettings {
        malformed: true,
        ..LimitSettings::default()
    });
    let mut app = TestApp::with_settings(|s| s.rate_limits.hubspot = "100/10s".into()).await;
    app.hubspot_workflow(&crm.url()).await;
    salesforce_workflow(&app, &crm).await;
    app.start_worker().await;

    // Act
    let ids = publish_many(&app, "u", 3).await;

    // Assert: both providers' runs succeed, and nothing was learned from the bad headers.
    wait_succeeded(&app, "u", 2 * ids.len(), Duration::from_secs(15)).await;
    let requests = crm.standin.requests();
    assert!(
        requests.iter().any(|r| r.path.starts_with("/crm/")),
        "{requests:?}"
    );
    for connection in connections::list(&app.pool, Some("u")).await.expect("list") {
        assert_eq!(connection.learned_rate_limit, None);
        assert_eq!(connection.api_usage, None);
        assert_eq!(connection.rate_limit_remaining, None);
    }
    app.cleanup().await;
}

#[tokio::test]
async fn bad_limits_are_refused_where_they_are_defined_naming_the_key() {
    let app = TestApp::new().await;
    // The command line: one line, a non-zero exit, nothing stored.
    for bad in ["0/10s", "-5/1s", "lots"] {
        let (code, _, err) = cli::run(
            &app,
            &[
                "connection",
                "create",
                "--user",
                "u",
                "--provider",
                "hubspot",
                "--base-url",
                "http://127.0.0.1:9",
                "--access-token",
                "t",
                "--rate-limit",
                bad,
            ],
        )
        .await;
        assert_ne!(code, 0, "{bad}");
        assert!(err.contains("--rate-limit"), "{bad}: {err}");
    }
    assert!(
        connections::list(&app.pool, None)
            .await
            .expect("list")
            .is_empty()
    );

    // A connection's own limit is set and cleared by `connection update`.
    let id = cli::ok(
        &app,
        &[
            "connection",
            "create",
            "--user",
            "w",
            "--provider",
            "hubspot",
            "--base-url",
            "http://127.0.0.1:9",
            "--access-token",
            "t",
        ],
    )
    .await;
    cli::ok(&app, &["connection", "update", &id, "--rate-limit", "7/1s"]).await;
    let listed = cli::ok(&app, &["connection", "list", "--user", "w"]).await;
    assert!(listed.contains("7/1s"), "{listed}");
    cli::ok(&app, &["connection", "update", &id, "--rate-limit", "none"]).await;
    let listed = cli::ok(&app, &["connection", "list", "--user", "w"]).await;
    assert!(
        !listed.contains("7/1s") && listed.contains("none"),
        "back to the default, none in tests: {listed}"
    );
    connections::delete(&app.pool, id.parse().expect("id"), None)
        .await
        .expect("delete");

    // The API: 400 naming the field; a good limit is stored and listed.
    let server = ServerHandle::start(&app.settings).await;
    let body = |limit: &str| json!({"provider": "hubspot", "base_url": "http://127.0.0.1:9", "access_token": "t", "rate_limit": limit});
    let refused = server
        .post("/v1/users/u/connections")
        .json(&body("0/1s"))
        .send()
        .await
        .expect("post");
    assert_eq!(refused.status(), 400);
    let text = refused.text().await.expect("body");
    assert!(text.contains("rate_limit"), "{text}");
    let created = server
        .post("/v1/users/u/connections")
        .json(&body("50/10s"))
        .send()
        .await
        .expect("post");
    assert_eq!(created.status(), 201);
    let listed: serde_json::Value = server
        .request(reqwest::Method::GET, "/v1/users/u/connections")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(listed[0]["rate_limit"], "50/10s", "{listed}");
    server.stop().await;
    app.cleanup().await;
}
