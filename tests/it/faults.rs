//! Losing the database or the broker pauses work and loses nothing; a message that keeps
//! killing its worker is dead-lettered as poison.

use std::time::Duration;

use appevents::pipeline::runs::RunStatus;
use appevents_standin::{self as standin, Faults};
use secrecy::SecretString;
use serde_json::json;

use crate::support::{Proxy, TestApp, appevents_command, eventually, readiness, signal};

const EVENT: &str = "Contact Created";

#[tokio::test]
async fn a_database_outage_holds_events_unacknowledged_and_resumes() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.url()).await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let direct = appevents::store::db::pg_config(app.settings.database_url()).expect("url");
    app.settings.database.url = SecretString::from(format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        proxy.addr.port(),
        direct.get_dbname().unwrap_or_default()
    ));
    app.start_worker().await;
    assert_eq!(readiness(&app).await.0, 200);

    proxy.cut();
    let id = app
        .publish(EVENT, "u", json!({"email": "held@example.com"}), None)
        .await;
    let held = eventually(Duration::from_secs(10), || async {
        app.worker().context.metrics.events_in_flight.get() == 1
    })
    .await;
    assert!(
        held,
        "the worker holds the event while the database is down"
    );
    let (status, body) = readiness(&app).await;
    assert_eq!(status, 503);
    assert!(body.contains("database"), "{body}");
    assert!(
        app.runs(&id).await.is_empty(),
        "nothing recorded, nothing acknowledged"
    );
    assert!(crm.standin.requests().is_empty());

    proxy.restore();
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    let ready = eventually(Duration::from_secs(10), || async {
        readiness(&app).await.0 == 200
    })
    .await;
    assert!(ready, "ready again once the database is back");
    assert_eq!(crm.standin.records().len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_broker_outage_pauses_consumption_and_recovers_without_duplicates() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    crm.standin.set_faults(Faults {
        latency_ms: 1500,
        ..Faults::default()
    });
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.url()).await;
    let direct = app.settings.clone();
    let proxy = Proxy::start("127.0.0.1:5672").await;
    app.settings.amqp.url = SecretString::from(format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        proxy.addr.port()
    ));
    app.start_worker().await;

    let publish = |email: &'static str| {
        let settings = direct.clone();
        async move {
            let publisher = appevents::transport::publish::EventPublisher::connect(
                &settings,
                appevents::transport::broker::Recovery::None,
            )
            .await
            .expect("publisher");
            let id = publisher
                .publish(&appevents::transport::publish::NewEvent {
                    id: None,
                    name: EVENT.into(),
                    user_id: "u".into(),
                    payload: json!({"email": email}),
                    occurred_at: None,
                })
                .await
                .expect("publish");
            publisher.close().await;
            id
        }
    };
    // The connection drops while this event's CRM call is in flight: its acknowledgement is
    // lost, the broker redelivers it, and the recorded run absorbs the redelivery.
    let in_flight = publish("in-flight@example.com").await;
    let calling = eventually(Duration::from_secs(10), || async {
        app.worker().context.metrics.events_in_flight.get() == 1
    })
    .await;
    assert!(calling);
    proxy.cut();
    // The client notices the lost connection within moments, not at once.
    let not_ready = eventually(Duration::from_secs(10), || async {
        let (status, body) = readiness(&app).await;
        status == 503 && body.contains("broker")
    })
    .await;
    assert!(not_ready, "readiness reports the broker");

    let during = publish("during@example.com").await;
    app.wait_for_runs(&in_flight, 1, RunStatus::Succeeded).await;
    assert!(
        app.runs(&during).await.is_empty(),
        "nothing consumed while the broker is unreachable"
    );

    proxy.restore();
    app.wait_for_runs(&during, 1, RunStatus::Succeeded).await;
    let back = eventually(Duration::from_secs(20), || async {
        readiness(&app).await.0 == 200 && app.queue_depth(&app.settings.amqp.queue).await == 0
    })
    .await;
    assert!(back, "consuming and ready again");
    let records = crm.standin.records();
    assert_eq!(records.len(), 2, "{records:#?}");
    assert!(
        records.iter().all(|r| r.creates == 1 && r.updates == 0),
        "no duplicate: {records:#?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_message_that_keeps_killing_its_worker_is_dead_lettered_as_poison() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    crm.standin.set_faults(Faults {
        latency_ms: 1000,
        ..Faults::default()
    });
    let app = TestApp::with_settings(|s| {
        s.worker.max_deliveries = 3;
        s.worker.claim_lease = Duration::from_secs(2);
    })
    .await;
    app.hubspot_workflow(&crm.url()).await;
    let id = app
        .publish(
            EVENT,
            "u",
            json!({"email": "poison@example.com"}),
            Some("evt-poison"),
        )
        .await;

    let claims = || async {
        let client = app.pool.get().await.expect("client");
        client
            .query_opt("select claims from runs where event_id = $1", &[&id])
            .await
            .expect("query")
            .map(|row| row.get::<_, i32>(0))
            .unwrap_or(0)
    };
    // Kill the worker with SIGKILL each time it has claimed the run and is calling the CRM.
    for cycle in 1..=3 {
        let mut worker = appevents_command(&app.settings, &["worker"])
            .spawn()
            .expect("worker");
        let claimed = eventually(Duration::from_secs(20), || async {
            claims().await >= cycle
        })
        .await;
        assert!(claimed, "cycle {cycle}: the run was claimed");
        signal(&worker, "KILL");
        let _ = worker.wait().await;
    }
    let mut worker = appevents_command(&app.settings, &["worker"])
        .spawn()
        .expect("worker");
    let letters = app.dead_letters_until(1, Duration::from_secs(30)).await;
    signal(&worker, "TERM");
    let _ = worker.wait().await;

    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].header("x-appevents-reason-code").as_deref(),
        Some("poison")
    );
    assert_eq!(
        letters[0].header("x-appevents-event-id").as_deref(),
        Some("evt-poison")
    );
    let runs = app.runs(&id).await;
    assert_eq!(runs[0].status, RunStatus::Dead, "{runs:#?}");
    assert!(crm.standin.records().is_empty(), "no call ever completed");
    app.cleanup().await;
}

#[tokio::test]
async fn a_database_url_naming_several_hosts_uses_the_one_that_takes_writes() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    // The first host refuses connections, as a failed primary would; the second is the one.
    let mut app = TestApp::with_settings(|s| {
        let url = s
            .database_url()
            .replacen("@127.0.0.1:5432/", "@127.0.0.1:1,127.0.0.1:5432/", 1);
        s.database.url = SecretString::from(format!("{url}?target_session_attrs=read-write"));
    })
    .await;
    app.hubspot_workflow(&crm.url()).await;
    app.start_worker().await;

    let id = app
        .publish(EVENT, "u", json!({"email": "failover@example.com"}), None)
        .await;

    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    assert_eq!(readiness(&app).await.0, 200);
    app.cleanup().await;
}
