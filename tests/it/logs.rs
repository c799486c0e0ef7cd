//! The worker's JSON logs: every line logged within a run carries that run's event id and
//! workflow id and no other, however many events the worker processes at once.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use appevents::core::provider::Provider;
use appevents::pipeline::runs::RunStatus;
use appevents_standin as standin;
use serde_json::{Value, json};

use crate::support::{CONTACT_CREATED, TestApp, appevents_command, eventually, signal};

/// Every value of `field` in a line: its own, its current span's and those of the spans it
/// sits in.
fn values(line: &Value, field: &str) -> BTreeSet<String> {
    let mut spans: Vec<&Value> = vec![line];
    spans.extend(line.get("span"));
    spans.extend(
        line.get("spans")
            .and_then(Value::as_array)
            .into_iter()
            .flatten(),
    );
    spans
        .iter()
        .filter_map(|span| span.get(field).and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_line_of_a_run_carries_only_its_own_event_and_workflow() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::with_settings(|s| s.worker.concurrency = 32).await;
    app.app_event(CONTACT_CREATED).await;
    for (provider, action, mapping) in [
        (
            Provider::Hubspot,
            "create-contact",
            json!({"email": "{{payload.email}}"}),
        ),
        (
            Provider::Salesforce,
            "create",
            json!({"Email": "{{payload.email}}", "LastName": "L"}),
        ),
    ] {
        let workflow = app
            .workflow(
                provider.as_str(),
                CONTACT_CREATED,
                provider,
                action,
                json!({}),
                mapping,
            )
            .await;
        let connection = app.connection("u", provider, &crm.url(), "token").await;
        app.subscribe("u", workflow.id, connection).await;
    }
    let mut worker = appevents_command(&app.settings, &["worker"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker");
    // Read as it comes: a full pipe would block the worker's logging.
    let mut stderr = worker.stderr.take().expect("stderr");
    let logs = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    const EVENTS: usize = 300;
    let publisher = app.publisher().await;
    for n in 0..EVENTS {
        publisher
            .publish(&appevents::transport::publish::NewEvent {
                id: Some(format!("evt-log-{n}")),
                name: CONTACT_CREATED.into(),
                user_id: "u".into(),
                payload: json!({"email": format!("log{n}@example.com")}),
                occurred_at: None,
            })
            .await
            .expect("publish");
    }
    publisher.close().await;
    let done = eventually(Duration::from_secs(60), || async {
        app.all_runs()
            .await
            .iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .count()
            == 2 * EVENTS
    })
    .await;
    assert!(done, "every run succeeded");
    signal(&worker, "TERM");
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker stops");
    let output = logs.await.expect("logs");

    let mut run_lines = 0;
    let mut mixed = Vec::new();
    for line in output.lines() {
        let Ok(line) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (events, workflows) = (values(&line, "event_id"), values(&line, "workflow_id"));
        if events.len() > 1 || workflows.len() > 1 {
            mixed.push(line.to_string());
        }
        if line.get("message").and_then(Value::as_str) == Some("run succeeded") {
            run_lines += 1;
            assert_eq!(
                (events.len(), workflows.len()),
                (1, 1),
                "a run's line names its event and workflow: {line}"
            );
        }
    }
    assert_eq!(run_lines, 2 * EVENTS, "one line per succeeded run");
    assert!(
        mixed.is_empty(),
        "{} lines carry another run's ids, e.g. {:?}",
        mixed.len(),
        mixed.first()
    );
    app.cleanup().await;
}
