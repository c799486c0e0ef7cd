//! Recovery from a worker killed with SIGKILL: its runs are taken over within seconds of its
//! death (claims follow the worker's liveness, renewed every third of a lease), and the run
//! it left is executed once.

use std::time::{Duration, Instant};

use appevents::pipeline::runs::RunStatus;
use appevents_standin::{self as standin, Faults};
use serde_json::json;

use crate::support::{CONTACT_CREATED, TestApp, appevents_command, eventually, signal};

#[tokio::test]
async fn a_killed_worker_s_run_is_taken_over_within_seconds_and_runs_once() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    // Slow enough that the worker is killed while the run is in flight.
    crm.standin.set_faults(Faults {
        latency_ms: 2000,
        ..Faults::default()
    });
    // The shipped lease, not a test's shortened one: the figure is what operators get.
    let lease = appevents::config::Settings::defaults()
        .expect("defaults")
        .worker
        .claim_lease;
    let mut app = TestApp::with_settings(|s| s.worker.claim_lease = lease).await;
    app.hubspot_workflow(&crm.url()).await;
    let mut doomed = appevents_command(&app.settings, &["worker"])
        .spawn()
        .expect("worker");
    let id = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "taken-over@example.com"}),
            Some("evt-taken-over"),
        )
        .await;
    let running = eventually(Duration::from_secs(20), || async {
        app.runs(&id)
            .await
            .first()
            .is_some_and(|run| run.status == RunStatus::Running)
    })
    .await;
    assert!(running, "the first worker claimed the run");

    signal(&doomed, "KILL");
    let killed = Instant::now();
    let _ = doomed.wait().await;
    app.start_worker().await;
    let done = eventually(Duration::from_secs(45), || async {
        app.runs(&id)
            .await
            .first()
            .is_some_and(|run| run.status == RunStatus::Succeeded)
    })
    .await;
    let takeover = killed.elapsed();

    println!(
        "takeover after SIGKILL: {:.1}s (lease {lease:?}, the CRM answering in 2s)",
        takeover.as_secs_f64()
    );
    assert!(done, "the run was taken over: {:#?}", app.runs(&id).await);
    assert!(takeover <= Duration::from_secs(30), "{takeover:?}");
    let runs = app.runs(&id).await;
    assert_eq!((runs[0].claims, runs[0].abandoned), (2, 1), "{runs:#?}");
    let records = crm.standin.records();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0].creates, 1, "no duplicate: {records:#?}");
    app.cleanup().await;
}
