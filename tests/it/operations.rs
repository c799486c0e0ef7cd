//! Operations: dead-letter replay and purge, run history, metrics.

use std::time::Duration;

use appevents::core::provider::Provider;
use appevents::pipeline::runs::RunStatus;
use appevents::transport::publisher::Publisher;
use appevents_standin::{self as standin, Faults};
use serde_json::{Value, json};

use crate::support::{
    CONTACT_CREATED, TestApp, appevents_command, eventually, failing_crm, signal,
};

/// Runs the binary; returns (status code, stdout, stderr).
async fn run(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    let output = appevents_command(&app.settings, args)
        .output()
        .await
        .expect("run appevents");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    )
}

/// A Salesforce create workflow whose record names the event, so duplicates show.
pub(crate) async fn salesforce_workflow(app: &TestApp, crm: &str, user: &str) -> uuid::Uuid {
    let workflow = app
        .workflow(
            &format!("sf {user}"),
            CONTACT_CREATED,
            Provider::Salesforce,
            "create",
            json!({}),
            json!({"LastName": "{{payload.last_name}}", "Description": "{{id}}"}),
        )
        .await;
    let conn = app.connection(user, Provider::Salesforce, crm, "t").await;
    app.subscribe(user, workflow.id, conn).await;
    workflow.id
}

#[tokio::test]
async fn replay_moves_exactly_the_matching_letters_and_leaves_the_rest_in_order() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let wf_a = salesforce_workflow(&app, &crm.url(), "user-a").await;
    let wf_b = salesforce_workflow(&app, &crm.url(), "user-b").await;
    let publisher = Publisher::open(&app.amqp).await.expect("publisher");
    for n in 0..10 {
        app.seed_dead_letter(
            &publisher,
            &format!("a-{n}"),
            "user-a",
            wf_a,
            json!({"last_name": "A"}),
        )
        .await;
        app.seed_dead_letter(
            &publisher,
            &format!("b-{n}"),
            "user-b",
            wf_b,
            json!({"last_name": "B"}),
        )
        .await;
    }

    let (code, out, _) = run(&app, &["dlq", "replay", "--user", "user-a", "--dry-run"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("would replay 10 dead letter(s)"), "{out}");
    assert_eq!(
        app.dead_letter_ids().await.len(),
        20,
        "a dry run moves nothing"
    );

    let (code, out, err) = run(&app, &["dlq", "replay", "--user", "user-a"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 10 dead letter(s)"), "{out}");
    let left = app.dead_letter_ids().await;
    let expected: Vec<String> = (0..10).map(|n| format!("b-{n}")).collect();
    assert_eq!(left, expected, "the others stay, in order");
    let moved = app.take_all(&app.settings.amqp.queue).await;
    let mut moved_ids: Vec<String> = moved
        .iter()
        .map(|m| {
            serde_json::from_slice::<Value>(&m.body).expect("event")["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    moved_ids.sort();
    let mut wanted: Vec<String> = (0..10).map(|n| format!("a-{n}")).collect();
    wanted.sort();
    assert_eq!(moved_ids, wanted);
    assert!(
        moved
            .iter()
            .all(|m| m.header("x-appevents-replay").as_deref() == Some("Boolean(true)"))
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_replayed_event_succeeds_once_the_crm_is_fixed() {
    let crm = failing_crm(503).await;
    let mut app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    salesforce_workflow(&app, &crm.url(), "u").await;
    app.start_worker().await;

    let id = app
        .publish(CONTACT_CREATED, "u", json!({"last_name": "Outage"}), None)
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Dead).await;
    let run_id = runs[0].id.to_string();
    let dead = eventually(Duration::from_secs(5), || async {
        app.dead_letter_ids().await.len() == 1
    })
    .await;
    assert!(dead);

    // The CRM is back; one dead run is retried on its own.
    crm.standin.set_faults(Faults::default());
    let (code, out, err) = run(&app, &["runs", "retry", &run_id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed run"), "{out}");
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    let created: Vec<_> = crm.standin.records();
    assert_eq!(created.len(), 1);
    assert!(app.dead_letter_ids().await.is_empty());
    let (code, _, err) = run(&app, &["runs", "retry", &run_id]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not dead"), "{err}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_replay_killed_half_way_loses_nothing_and_creates_no_duplicate() {
    const LETTERS: usize = 1500;
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let workflow = salesforce_workflow(&app, &crm.url(), "u").await;
    let publisher = Publisher::open(&app.amqp).await.expect("publisher");
    for n in 0..LETTERS {
        app.seed_dead_letter(
            &publisher,
            &format!("evt-{n}"),
            "u",
            workflow,
            json!({"last_name": format!("L{n}")}),
        )
        .await;
    }

    let mut replay = appevents_command(&app.settings, &["dlq", "replay"])
        .spawn()
        .expect("replay");
    let halfway = eventually(Duration::from_secs(30), || async {
        app.queue_depth(&app.settings.amqp.queue).await >= 100
    })
    .await;
    assert!(halfway, "the replay got going");
    signal(&replay, "KILL");
    let _ = replay.wait().await;
    let moved = app.queue_depth(&app.settings.amqp.queue).await as usize;
    let left = app.dead_letter_ids().await.len();
    assert!(moved < LETTERS, "killed half-way ({moved} moved)");
    assert!(
        moved + left >= LETTERS,
        "nothing lost: {moved} moved + {left} left"
    );

    let (code, _, err) = run(&app, &["dlq", "replay"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(app.dead_letter_ids().await.is_empty());
    app.start_worker().await;
    let all = eventually(Duration::from_secs(60), || async {
        app.all_runs()
            .await
            .iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .count()
            == LETTERS
    })
    .await;
    assert!(all, "every replayed event ran");
    let records = crm.standin.records();
    let mut described: Vec<String> = records
        .iter()
        .filter_map(|r| {
            r.fields
                .get("Description")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    described.sort();
    described.dedup();
    assert_eq!(records.len(), LETTERS, "one contact per event");
    assert_eq!(described.len(), LETTERS, "no event created twice");
    app.cleanup().await;
}

#[tokio::test]
async fn purge_refuses_without_yes_and_then_deletes_only_what_matches() {
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let publisher = Publisher::open(&app.amqp).await.expect("publisher");
    let workflow = uuid::Uuid::now_v7();
    for n in 0..3 {
        app.seed_dead_letter(
            &publisher,
            &format!("keep-{n}"),
            "keep",
            workflow,
            json!({}),
        )
        .await;
        app.seed_dead_letter(
            &publisher,
            &format!("drop-{n}"),
            "drop",
            workflow,
            json!({}),
        )
        .await;
    }

    let (code, out, err) = run(&app, &["dlq", "purge", "--user", "drop"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("refusing to purge 3 dead letter(s) without --yes"),
        "{err}"
    );
    assert!(out.contains("3 dead letter(s) match"), "{out}");
    assert_eq!(app.dead_letter_ids().await.len(), 6);

    let (code, out, err) = run(&app, &["dlq", "purge", "--user", "drop", "--yes"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("purged 3"), "{out}");
    assert_eq!(
        app.dead_letter_ids().await,
        vec!["keep-0", "keep-1", "keep-2"]
    );

    let (code, out, _) = run(&app, &["dlq", "list", "--json"]).await;
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed["report"]["matched"], 3);
    assert_eq!(listed["letters"][0]["user_id"], "keep");
    assert_eq!(listed["letters"][0]["reason_code"], "exhausted");
    assert_eq!(listed["letters"][0]["attempts"], 9);
    app.cleanup().await;
}

#[tokio::test]
async fn run_history_filters_and_metrics_move() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let wf = salesforce_workflow(&app, &crm.url(), "u1").await;
    salesforce_workflow(&app, &crm.url(), "u2").await;
    app.start_worker().await;

    let first = app
        .publish(CONTACT_CREATED, "u1", json!({"last_name": "One"}), None)
        .await;
    let second = app
        .publish(CONTACT_CREATED, "u2", json!({"last_name": "Two"}), None)
        .await;
    let bad = app
        .publish(
            CONTACT_CREATED,
            "u1",
            json!({"first_name": "no last name"}),
            None,
        )
        .await;
    app.wait_for_runs(&first, 1, RunStatus::Succeeded).await;
    app.wait_for_runs(&second, 1, RunStatus::Succeeded).await;
    let dead = app.wait_for_runs(&bad, 1, RunStatus::Dead).await;

    let list = |args: Vec<&'static str>| {
        let app = &app;
        async move {
            let mut full = vec!["runs", "list", "--json"];
            full.extend(args);
            let (code, out, err) = run(app, &full).await;
            assert_eq!(code, 0, "{err}");
            serde_json::from_str::<Vec<Value>>(&out).expect("json")
        }
    };
    assert_eq!(list(vec!["--user", "u1"]).await.len(), 2);
    assert_eq!(list(vec!["--status", "dead"]).await.len(), 1);
    assert_eq!(
        list(vec!["--status", "succeeded", "--since", "1h"])
            .await
            .len(),
        2
    );
    assert_eq!(list(vec!["--until", "1h"]).await.len(), 0);
    let (code, out, _) = run(
        &app,
        &["runs", "list", "--json", "--workflow", &wf.to_string()],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&out)
            .expect("json")
            .len(),
        2
    );
    let (code, out, _) = run(&app, &["runs", "show", &dead[0].id.to_string()]).await;
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown["status"], "dead");
    assert_eq!(shown["last_error"]["code"], "REQUIRED_FIELD_MISSING");

    let metrics = app.metrics().await;
    for expected in [
        r#"appevents_events_total{outcome="processed"} 3"#,
        r#"appevents_runs_total{provider="salesforce",outcome="succeeded"} 2"#,
        r#"appevents_runs_total{provider="salesforce",outcome="dead"} 1"#,
        r#"appevents_dead_letters_total{reason="permanent"} 1"#,
        r#"appevents_step_duration_seconds_count{provider="salesforce"} 3"#,
        "appevents_consumer_connected 1",
        "appevents_events_in_flight 0",
    ] {
        assert!(metrics.contains(expected), "{expected} not in\n{metrics}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn the_dead_letter_metric_uses_the_reason_code_of_the_header() {
    let mut app = TestApp::new().await;
    app.start_worker().await;
    app.publish_raw(
        "Contact Created",
        br#"{"name": "Contact Created", "user_id": "u", "payload": []}"#,
        lapin::BasicProperties::default().with_content_type("application/json".into()),
    )
    .await;
    let letters = app
        .dead_letters_until(1, std::time::Duration::from_secs(10))
        .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].header("x-appevents-reason-code").as_deref(),
        Some("invalid")
    );
    let expected = r#"appevents_dead_letters_total{reason="invalid",detail="wrong_type"} 1"#;
    let counted = crate::support::eventually(std::time::Duration::from_secs(5), || async {
        app.metrics().await.contains(expected)
    })
    .await;
    assert!(counted, "{expected} not in\n{}", app.metrics().await);
    app.cleanup().await;
}

#[tokio::test]
async fn dlq_list_names_workflows_and_the_event_of_an_invalid_letter() {
    let mut app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let workflow = app
        .workflow(
            "Contact to HubSpot",
            CONTACT_CREATED,
            Provider::Hubspot,
            "create-contact",
            json!({}),
            json!({"email": "{{payload.email}}"}),
        )
        .await;
    let publisher = Publisher::open(&app.amqp).await.expect("publisher");
    app.seed_dead_letter(&publisher, "evt-1", "u", workflow.id, json!({}))
        .await;
    app.start_worker().await;
    app.publish_raw(
        CONTACT_CREATED,
        br#"{"name": "Contact Created", "user_id": "u", "payload": []}"#,
        lapin::BasicProperties::default().with_content_type("application/json".into()),
    )
    .await;
    let both = eventually(Duration::from_secs(10), || async {
        let (_, out, _) = run(&app, &["dlq", "list", "--json"]).await;
        serde_json::from_str::<Value>(&out)
            .map(|v| v["report"]["matched"] == 2)
            .unwrap_or(false)
    })
    .await;
    assert!(both, "two dead letters");

    let table = crate::cli::ok(&app, &["dlq", "list"]).await;
    let rows: Vec<&str> = table.lines().skip(1).take(2).collect();
    assert!(
        rows[0].contains("Contact to HubSpot") && !rows[0].contains(&workflow.id.to_string()),
        "the workflow by name, as runs list shows it: {table}"
    );
    assert!(
        rows[1].contains(CONTACT_CREATED) && rows[1].contains("invalid event"),
        "an invalid letter shows the event its body names: {table}"
    );
    app.cleanup().await;
}
