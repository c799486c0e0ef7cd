//! A message the worker cannot settle now is handed back to the broker (nacked), never left
//! unacknowledged until the channel closes: its delivery is counted, and past
//! `worker.max_deliveries` it is dead-lettered as poison. A run another worker holds waits
//! what is left of that hold. While a dependency is unavailable readiness says which.

use std::time::{Duration, Instant};

use appevents::observe::health::{Dependency, Health};
use appevents::pipeline::runs::RunStatus;
use serde_json::json;
use uuid::Uuid;

use crate::support::{CONTACT_CREATED, TestApp, eventually};

/// Marks the run of (`user`, `event_id`, `workflow`) as held, for `hold` more, by a worker
/// that claimed it before workers renewed their liveness (no worker row: the claim's own
/// expiry counts).
async fn hold_run(app: &TestApp, user: &str, event_id: &str, workflow: Uuid, hold: Duration) {
    let client = app.pool.get().await.expect("client");
    client
        .execute(
            "with key as (insert into run_keys (workflow_id, run_id, created_at, event_id, user_id) \
             values ($5, $1, now(), $3, $2) returning run_id, created_at) \
             insert into runs (id, created_at, user_id, event_id, event_name, workflow_id, status, \
             claims, claim_token, claimed_until) \
             select run_id, created_at, $2, $3, $4, $5, 'running', 1, $6, \
             now() + make_interval(secs => $7) from key",
            &[
                &Uuid::now_v7(),
                &user,
                &event_id,
                &CONTACT_CREATED,
                &workflow,
                &Uuid::new_v4(),
                &hold.as_secs_f64(),
            ],
        )
        .await
        .expect("held run");
}

#[tokio::test]
async fn a_held_run_waits_what_is_left_of_the_hold_not_a_retry_delay() {
    let crm = appevents_standin::spawn("127.0.0.1:0")
        .await
        .expect("stand-in");
    // The only retry queue waits five minutes: a held run that waited there would not finish
    // within this test.
    let mut app = TestApp::with_settings(|s| {
        s.retry.schedule = vec![Duration::from_secs(300)];
    })
    .await;
    let workflow = app.hubspot_workflow(&crm.url()).await;
    hold_run(&app, "u", "evt-held", workflow, Duration::from_secs(2)).await;
    app.start_worker().await;
    let started = Instant::now();

    app.publish(
        CONTACT_CREATED,
        "u",
        json!({"email": "held@example.com"}),
        Some("evt-held"),
    )
    .await;

    let runs = app.wait_for_runs("evt-held", 1, RunStatus::Succeeded).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "not run while held: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert_eq!(runs[0].claims, 2, "{runs:#?}");
    assert_eq!(crm.standin.records().len(), 1);
    assert!(app.take_dead_letters().await.is_empty());
    app.stop_worker().await;
    assert_eq!(app.queue_depth(&app.settings.amqp.queue).await, 0);
    assert_eq!(
        app.queue_depth(&format!("{}.held", app.settings.amqp.queue))
            .await,
        0
    );
    app.cleanup().await;
}

#[tokio::test]
async fn an_error_retrying_cannot_fix_hands_the_message_back_instead_of_holding_it() {
    let crm = wiremock::MockServer::start().await;
    // The CRM takes its time, so the workflow can be deleted while its run is in flight.
    crate::support::answer(
        &crm,
        "POST",
        wiremock::matchers::path("/crm/v3/objects/contacts"),
        wiremock::ResponseTemplate::new(201)
            .set_body_json(json!({"id": "1"}))
            .set_delay(Duration::from_secs(1)),
        1,
        false,
    )
    .await;
    let mut app = TestApp::new().await;
    let workflow = app.hubspot_workflow(&crm.uri()).await;
    app.start_worker().await;

    app.publish(
        CONTACT_CREATED,
        "u",
        json!({"email": "gone@example.com"}),
        Some("evt-gone"),
    )
    .await;
    let calling = eventually(Duration::from_secs(10), || async {
        !crm.received_requests().await.unwrap_or_default().is_empty()
    })
    .await;
    assert!(calling, "the run reached the CRM");
    // Its run row goes with the workflow: recording the outcome now breaks a foreign key,
    // which no retry can fix.
    appevents::catalog::workflows::delete(&app.pool, workflow)
        .await
        .expect("delete workflow");

    // Handed back, the message is delivered again and finds nothing to run.
    let unmatched = eventually(Duration::from_secs(15), || async {
        app.metrics()
            .await
            .contains(r#"appevents_events_total{outcome="unmatched"} 1"#)
    })
    .await;
    assert!(unmatched, "{}", app.metrics().await);
    app.stop_worker().await;
    assert_eq!(app.queue_depth(&app.settings.amqp.queue).await, 0);
    assert!(app.take_dead_letters().await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn readiness_names_each_dependency_a_unit_of_work_found_unavailable() {
    let app = TestApp::new().await;
    let health = Health::new(app.pool.clone());
    health.set_broker(Some(app.amqp.status().clone()));
    assert_eq!(health.check().await, Ok(()), "both dependencies answer");

    // A unit of work could not publish, while the broker connection itself looks fine.
    health.failed(
        Dependency::Broker,
        "publish retry: channel closed".to_owned(),
    );
    assert_eq!(
        health.check().await,
        Err(vec!["broker: publish retry: channel closed".to_owned()]),
        "a broker failure is the broker's, not the database's"
    );
    health.failed(
        Dependency::Database,
        "record run: pool timed out".to_owned(),
    );
    assert_eq!(
        health.check().await,
        Err(vec![
            "broker: publish retry: channel closed".to_owned(),
            "database: record run: pool timed out".to_owned()
        ])
    );

    assert!(health.recovered(Dependency::Broker));
    assert!(health.recovered(Dependency::Database));
    assert_eq!(
        health.check().await,
        Ok(()),
        "ready once each answered again"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn readiness_says_when_the_database_accepts_no_writes() {
    let app = TestApp::new().await;
    let name = appevents::store::db::pg_config(app.settings.database_url())
        .expect("url")
        .get_dbname()
        .unwrap_or_default()
        .to_owned();
    let client = app.pool.get().await.expect("client");
    let set_read_only = |on: bool| {
        format!(
            "alter database \"{name}\" set default_transaction_read_only = {}",
            if on { "on" } else { "off" }
        )
    };
    // Sessions opened from now on are read-only, as on a standby.
    client
        .batch_execute(&set_read_only(true))
        .await
        .expect("read-only");
    let fresh = appevents::store::db::pool(&app.settings.database).expect("pool");
    let health = Health::new(fresh);
    health.set_broker(Some(app.amqp.status().clone()));

    let answer = health.check().await;

    client
        .batch_execute(&set_read_only(false))
        .await
        .expect("writable again");
    let problems = answer.expect_err("not ready");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("database: read-only"),
        "{problems:?}"
    );
    let writable = Health::new(appevents::store::db::pool(&app.settings.database).expect("pool"));
    writable.set_broker(Some(app.amqp.status().clone()));
    assert_eq!(writable.check().await, Ok(()));
    app.cleanup().await;
}
