//! A message the worker cannot settle now is handed back to the broker (nacked), never left
//! unacknowledged until the channel closes: its delivery is counted, and past
//! `worker.max_deliveries` it is dead-lettered as poison. While a dependency is unavailable
//! readiness says which.

use std::time::Duration;

use appevents::observe::health::{Dependency, Health};
use serde_json::json;
use uuid::Uuid;

use crate::support::{CONTACT_CREATED, TestApp, eventually};

/// Marks the run of (`user`, `event_id`, `workflow`) as held by another worker for an hour.
async fn hold_run(app: &TestApp, user: &str, event_id: &str, workflow: Uuid) {
    let client = app.pool.get().await.expect("client");
    client
        .execute(
            "insert into runs (id, user_id, event_id, event_name, workflow_id, status, claims, \
             claim_token, claimed_until) \
             values ($1, $2, $3, $4, $5, 'running', 1, $6, now() + interval '1 hour')",
            &[
                &Uuid::now_v7(),
                &user,
                &event_id,
                &CONTACT_CREATED,
                &workflow,
                &Uuid::new_v4(),
            ],
        )
        .await
        .expect("held run");
}

#[tokio::test]
async fn without_retry_queues_a_held_run_hands_its_message_back_to_the_broker() {
    // retry.schedule = []: there is no retry queue a held run could wait in.
    let mut app = TestApp::with_settings(|s| {
        s.retry.schedule = vec![];
        s.worker.max_deliveries = 3;
    })
    .await;
    let workflow = app.hubspot_workflow("http://127.0.0.1:9").await;
    hold_run(&app, "u", "evt-held", workflow).await;
    app.start_worker().await;

    app.publish(
        CONTACT_CREATED,
        "u",
        json!({"email": "held@example.com"}),
        Some("evt-held"),
    )
    .await;

    // Handed back each time, the message comes back with its deliveries counted, until the
    // worker gives up on it; left unacknowledged, it would sit in the worker forever.
    let letters = app.dead_letters_until(1, Duration::from_secs(20)).await;
    assert_eq!(
        letters.len(),
        1,
        "dead-lettered once its deliveries ran out"
    );
    assert_eq!(
        letters[0].header("x-appevents-reason-code").as_deref(),
        Some("poison")
    );
    assert_eq!(
        letters[0].header("x-appevents-event-id").as_deref(),
        Some("evt-held")
    );
    app.stop_worker().await;
    assert_eq!(
        app.queue_depth(&app.settings.amqp.queue).await,
        0,
        "nothing left in the work queue once the worker stopped"
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
