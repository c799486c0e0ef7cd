//! SIGTERM and SIGKILL against the real binary.

use std::time::Duration;

use appevents::core::provider::Provider;
use appevents::pipeline::runs::RunStatus;
use appevents_standin::{self as standin, Faults};
use serde_json::json;
use uuid::Uuid;

use crate::support::{TestApp, appevents_command, eventually, signal};

const EVENT: &str = "Order Placed";

/// The app event and its HTTP workflow; returns the workflow's id.
async fn hook(app: &TestApp) -> Uuid {
    app.app_event(EVENT).await;
    app.workflow(
        "hook",
        EVENT,
        Provider::Http,
        "request",
        json!({"url": "/hooks/orders"}),
        json!({"order": "{{payload.n}}"}),
    )
    .await
    .id
}

/// Switches the workflow on for `user`, calling `crm`.
async fn subscribe(app: &TestApp, hook: Uuid, user: &str, crm: &str) {
    let conn = app.connection(user, Provider::Http, crm, "t").await;
    app.subscribe(user, hook, conn).await;
}

async fn hook_workflow(app: &TestApp, crm: &str) {
    let hook = hook(app).await;
    subscribe(app, hook, "u", crm).await;
}

#[tokio::test]
async fn sigterm_with_events_in_flight_loses_none_and_runs_none_twice() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    crm.standin.set_faults(Faults {
        latency_ms: 300,
        ..Faults::default()
    });
    let mut app = TestApp::with_settings(|s| {
        s.worker.concurrency = 4;
        s.amqp.prefetch = 8;
    })
    .await;
    hook_workflow(&app, &crm.url()).await;
    let mut worker = appevents_command(&app.settings, &["worker"])
        .spawn()
        .expect("worker binary");

    let publisher = app.publisher().await;
    for n in 0..30 {
        publisher
            .publish(&appevents::transport::publish::NewEvent {
                id: Some(format!("order-{n}")),
                name: EVENT.into(),
                user_id: "u".into(),
                payload: json!({"n": n}),
                occurred_at: None,
            })
            .await
            .expect("publish");
    }
    publisher.close().await;
    let started = eventually(Duration::from_secs(15), || async {
        !crm.standin.records().is_empty()
    })
    .await;
    assert!(started, "the worker started processing");

    signal(&worker, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("exits within the grace period")
        .expect("wait");
    assert!(status.success(), "clean exit: {status:?}");

    // Whatever was in flight finished; nothing is left half-done.
    let runs = app.all_runs().await;
    assert!(
        runs.iter().all(|r| r.status == RunStatus::Succeeded),
        "{runs:#?}"
    );
    let done = runs.len();
    assert!(
        done < 30,
        "SIGTERM came while events were still queued ({done} done)"
    );
    assert_eq!(crm.standin.records().len(), done);
    // The broker requeues the unacknowledged messages once the channel closes, which it
    // notices a moment after the worker has gone.
    let queue = app.settings.amqp.queue.clone();
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.queue_depth(&queue).await as usize == 30 - done
        })
        .await,
        "the rest is back in the queue"
    );

    app.start_worker().await;
    let all = eventually(Duration::from_secs(30), || async {
        app.all_runs()
            .await
            .iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .count()
            == 30
    })
    .await;
    assert!(all, "every event processed after the restart");
    let records = crm.standin.records();
    assert_eq!(records.len(), 30, "each event's workflow ran exactly once");
    app.cleanup().await;
}

#[tokio::test]
async fn sigterm_when_idle_reports_nothing_in_flight() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::new().await;
    hook_workflow(&app, &crm.url()).await;
    let mut worker = appevents_command(&app.settings, &["worker"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("worker binary");
    for n in 0..4 {
        app.publish(EVENT, "u", json!({"n": n}), None).await;
    }
    let finished = eventually(Duration::from_secs(15), || async {
        app.all_runs()
            .await
            .iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .count()
            == 4
    })
    .await;
    assert!(finished, "the four events ran");
    // Each run is recorded before its message is acknowledged: wait for the acks too.
    tokio::time::sleep(Duration::from_millis(300)).await;

    signal(&worker, "TERM");
    let output = tokio::time::timeout(Duration::from_secs(20), async {
        let status = worker.wait().await.expect("wait");
        let mut stderr = String::new();
        use tokio::io::AsyncReadExt;
        worker
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .await
            .expect("read");
        (status, stderr)
    })
    .await
    .expect("exits");
    assert!(output.0.success(), "{}", output.1);
    assert!(output.1.contains("worker stopped"), "{}", output.1);
    assert!(
        !output.1.contains("finishing in-flight events"),
        "finished events are not counted as in flight: {}",
        output.1
    );
    app.cleanup().await;
}

#[tokio::test]
async fn sigterm_stops_a_worker_whose_log_reader_is_gone() {
    let app = TestApp::new().await;
    let mut worker = appevents_command(&app.settings, &["worker"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("worker binary");
    // Wait until it consumes, then close the pipe its logs go to (a log shipper that died).
    let queue = app.settings.amqp.queue.clone();
    let consuming = eventually(Duration::from_secs(15), || async {
        app.channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .is_ok_and(|q| q.consumer_count() > 0)
    })
    .await;
    assert!(consuming, "the worker consumes");
    drop(worker.stderr.take());

    signal(&worker, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("exits although its logs cannot be written")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_message_settled_behind_a_slow_one_is_acknowledged_without_waiting_for_it() {
    // One user's CRM answers after 8 s, the other's at once. Acknowledgements are coalesced
    // (one covers every settled message below the oldest still in hand), but the quick
    // user's messages, settled behind the slow one, must not wait for it.
    let slow = standin::spawn("127.0.0.1:0").await.expect("slow stand-in");
    slow.standin.set_faults(Faults {
        latency_ms: 8_000,
        ..Faults::default()
    });
    let quick = standin::spawn("127.0.0.1:0").await.expect("quick stand-in");
    let app = TestApp::new().await;
    let hook = hook(&app).await;
    subscribe(&app, hook, "slow", &slow.url()).await;
    subscribe(&app, hook, "quick", &quick.url()).await;
    let mut worker = appevents_command(&app.settings, &["worker"])
        .spawn()
        .expect("worker binary");

    // The slow event is delivered first: its tag is below every other.
    app.publish(EVENT, "slow", json!({"n": 0}), None).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            app.all_runs()
                .await
                .iter()
                .any(|r| r.user_id == "slow" && r.status == RunStatus::Running)
        })
        .await,
        "the slow event's run started"
    );
    for n in 1..=10 {
        app.publish(EVENT, "quick", json!({"n": n}), None).await;
    }
    let quick_done = eventually(Duration::from_secs(15), || async {
        app.all_runs()
            .await
            .iter()
            .filter(|r| r.user_id == "quick" && r.status == RunStatus::Succeeded)
            .count()
            == 10
    })
    .await;
    assert!(quick_done, "the quick events ran");
    // Their acknowledgements went out alone after a short linger, not behind the slow one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        slow.standin.records().is_empty(),
        "the slow call is still under way"
    );
    signal(&worker, "KILL");
    let _ = worker.wait().await;
    // Only what was in hand comes back: the slow event.
    let queue = app.settings.amqp.queue.clone();
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.queue_depth(&queue).await == 1
        })
        .await,
        "only the slow event is back in the queue, {} are",
        app.queue_depth(&queue).await
    );
    app.cleanup().await;
}
