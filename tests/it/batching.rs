//! Runs batched into the providers' batch endpoints, against the stand-in CRM: each record's
//! answer reaches its own run, one record's failure fails only its run, a failure of the
//! whole batch retries them all, a record the answer leaves out is retried and never taken
//! as a success, a kill in the middle of a batch writes nothing twice, and batching can be
//! turned off per action.

use std::collections::HashMap;
use std::time::Duration;

use appevents::core::provider::Provider;
use appevents::pipeline::runs::{Run, RunStatus};
use appevents::transport::publish::NewEvent;
use appevents_standin::{self as standin, Faults, ScriptedAnswer};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{CONTACT_CREATED, TestApp, appevents_command, eventually};

/// A workflow of `action` for user "u" on the stand-in. Returns the connection's id.
async fn workflow(
    app: &TestApp,
    crm: &standin::Running,
    provider: Provider,
    action: &str,
    options: Value,
    mapping: Value,
) -> Uuid {
    app.app_event(CONTACT_CREATED).await;
    let workflow = app
        .workflow("w", CONTACT_CREATED, provider, action, options, mapping)
        .await;
    let connection = app.connection("u", provider, &crm.url(), "token").await;
    app.subscribe("u", workflow.id, connection).await;
    connection
}

/// The stand-in, and an app whose batching window is 2 s (so that events published together
/// share a batch, however the machine schedules them) with a workflow of `action` for user
/// "u".
async fn arrange(
    provider: Provider,
    action: &str,
    options: Value,
    mapping: Value,
) -> (standin::Running, TestApp) {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::with_settings(|s| s.batching.window = Duration::from_secs(2)).await;
    workflow(&app, &crm, provider, action, options, mapping).await;
    (crm, app)
}

/// Sends one event through the running worker and waits for its run: the connection has just
/// sent a batch, so the events published next, within the window, wait for each other and go
/// out together however the machine schedules their admission. Returns the warm-up's email.
async fn warm_up(app: &TestApp) -> String {
    let email = "warm-up@example.com".to_owned();
    publish(app, std::slice::from_ref(&email), &[]).await;
    finished(app, 1, Duration::from_secs(20)).await;
    email
}

fn hubspot_mapping() -> Value {
    json!({"email": "{{payload.email}}", "firstname": "{{payload.first_name}}"})
}

fn salesforce_mapping() -> Value {
    json!({"Email": "{{payload.email}}", "LastName": "{{payload.last_name}}"})
}

/// Publishes one event per email, with `last_name` set unless the email is in `nameless`.
async fn publish(app: &TestApp, emails: &[String], nameless: &[&str]) -> Vec<String> {
    let publisher = app.publisher().await;
    let mut ids = Vec::new();
    for email in emails {
        let mut payload = json!({"email": email, "first_name": "A"});
        if !nameless.contains(&email.as_str()) {
            payload["last_name"] = json!("B");
        }
        let id = publisher
            .publish(&NewEvent {
                id: None,
                name: CONTACT_CREATED.to_owned(),
                user_id: "u".to_owned(),
                payload,
                occurred_at: None,
            })
            .await
            .expect("publish");
        ids.push(id);
    }
    publisher.close().await;
    ids
}

fn emails(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}-{i}@example.com"))
        .collect()
}

/// Waits until every run is finished (succeeded or dead) and returns them by event id.
async fn finished(app: &TestApp, n: usize, within: Duration) -> HashMap<String, Run> {
    let done = eventually(within, || async {
        let runs = app.all_runs().await;
        runs.len() >= n
            && runs
                .iter()
                .all(|r| matches!(r.status, RunStatus::Succeeded | RunStatus::Dead))
    })
    .await;
    let runs = app.all_runs().await;
    assert!(done, "expected {n} finished runs, have {runs:#?}");
    runs.into_iter().map(|r| (r.event_id.clone(), r)).collect()
}

fn calls_to(crm: &standin::Running, path_end: &str) -> usize {
    crm.standin
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(path_end))
        .count()
}

/// The id of the record the stand-in holds for `email` (HubSpot `email`, Salesforce `Email`).
fn record_id(crm: &standin::Running, email: &str) -> Option<String> {
    crm.standin
        .records()
        .into_iter()
        .find(|r| {
            r.fields
                .get("email")
                .or_else(|| r.fields.get("Email"))
                .and_then(Value::as_str)
                == Some(email)
        })
        .map(|r| r.id)
}

#[tokio::test]
async fn runs_of_one_connection_share_batch_calls_and_each_gets_its_own_record() {
    // Arrange: 250 events of one user waiting before the worker starts.
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::with_settings(|s| s.batching.window = Duration::from_millis(200)).await;
    workflow(
        &app,
        &crm,
        Provider::Hubspot,
        "upsert-contact",
        json!({}),
        hubspot_mapping(),
    )
    .await;
    let emails = emails("batched", 250);
    let ids = publish(&app, &emails, &[]).await;

    // Act
    app.start_worker().await;
    let runs = finished(&app, ids.len(), Duration::from_secs(60)).await;

    // Assert: every run succeeded with its own contact's id, in few calls of at most 100.
    for (id, email) in ids.iter().zip(&emails) {
        let run = &runs[id];
        assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
        assert_eq!(run.provider_id, record_id(&crm, email), "{email}: {run:#?}");
    }
    assert_eq!(crm.standin.records().len(), 250);
    let calls = calls_to(&crm, "/batch/upsert");
    assert_eq!(crm.standin.requests().len(), calls, "no single call");
    assert!((3..=25).contains(&calls), "250 records in {calls} calls");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("appevents_batch_records_count{action=\"hubspot upsert-contact\"}"),
        "{metrics}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn one_record_s_refusal_dead_letters_only_its_run_and_a_conflict_becomes_an_update() {
    // Arrange: one event's email is not an address, and one contact exists already.
    let (crm, mut app) = arrange(
        Provider::Hubspot,
        "create-contact",
        json!({}),
        hubspot_mapping(),
    )
    .await;
    let mut emails = emails("partial", 10);
    emails[3] = "not-an-address".into();
    let ids = publish(&app, &emails[..1], &[]).await;
    app.start_worker().await;
    finished(&app, 1, Duration::from_secs(20)).await;
    let existing = record_id(&crm, &emails[0]).expect("the first contact");
    let before = calls_to(&crm, "/batch/create");

    // Act: the existing contact's event again, with eight new ones and the bad one.
    let ids: Vec<String> = ids
        .into_iter()
        .chain(publish(&app, &emails, &[]).await)
        .collect();
    let runs = finished(&app, ids.len(), Duration::from_secs(30)).await;

    // Assert
    let bad = &runs[&ids[1 + 3]];
    assert_eq!(bad.status, RunStatus::Dead, "{bad:#?}");
    assert!(
        bad.last_error
            .as_ref()
            .is_some_and(|e| e.to_string().contains("VALIDATION_ERROR")),
        "{bad:#?}"
    );
    let letters = app.dead_letters_until(1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1, "only the refused record's run");
    let again = &runs[&ids[1]];
    assert_eq!(again.status, RunStatus::Succeeded, "{again:#?}");
    assert_eq!(again.provider_id.as_deref(), Some(existing.as_str()));
    for (id, email) in ids.iter().skip(2).zip(emails.iter().skip(1)) {
        if email == "not-an-address" {
            continue;
        }
        assert_eq!(runs[id].status, RunStatus::Succeeded, "{:#?}", runs[id]);
        assert_eq!(runs[id].provider_id, record_id(&crm, email));
    }
    let records = crm.standin.records();
    assert_eq!(records.len(), 9, "{records:#?}");
    assert!(records.iter().all(|r| r.creates == 1), "{records:#?}");
    // Published one by one into a quiet key: the first went at once, the others, close
    // behind, together.
    let calls = calls_to(&crm, "/batch/create") - before;
    assert!((1..=2).contains(&calls), "ten creates in {calls} calls");
    assert_eq!(
        calls_to(&crm, &format!("/contacts/{existing}")),
        1,
        "the conflict became an update of the existing contact"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_salesforce_collection_fails_only_the_record_it_refuses() {
    let (crm, mut app) = arrange(
        Provider::Salesforce,
        "upsert",
        json!({"external_id_field": "Email"}),
        salesforce_mapping(),
    )
    .await;
    app.start_worker().await;
    warm_up(&app).await;
    let emails = emails("collection", 6);

    let ids = publish(&app, &emails, &[emails[2].as_str()]).await;
    let runs = finished(&app, 1 + ids.len(), Duration::from_secs(30)).await;

    for (i, (id, email)) in ids.iter().zip(&emails).enumerate() {
        let run = &runs[id];
        if i == 2 {
            assert_eq!(run.status, RunStatus::Dead, "{run:#?}");
            let error = run
                .last_error
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_default();
            assert!(
                error.contains("REQUIRED_FIELD_MISSING") && error.contains("LastName"),
                "{error}"
            );
        } else {
            assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
            assert_eq!(run.provider_id, record_id(&crm, email));
        }
    }
    assert_eq!(
        calls_to(&crm, "/composite/sobjects/Contact/Email"),
        2,
        "the warm-up's, and one for the six"
    );
    assert_eq!(crm.standin.records().len(), 1 + 5);
    app.cleanup().await;
}

#[tokio::test]
async fn a_batch_answered_429_or_503_retries_every_run_and_writes_each_record_once() {
    let (crm, mut app) = arrange(
        Provider::Hubspot,
        "create-contact",
        json!({}),
        hubspot_mapping(),
    )
    .await;
    crm.standin.set_faults(Faults {
        script: vec![
            ScriptedAnswer {
                status: 429,
                retry_after: Some(0),
                body: None,
            },
            ScriptedAnswer {
                status: 503,
                ..ScriptedAnswer::default()
            },
        ],
        ..Faults::default()
    });
    let emails = emails("refused", 8);
    let ids = publish(&app, &emails, &[]).await;

    app.start_worker().await;
    let runs = finished(&app, ids.len(), Duration::from_secs(30)).await;

    assert!(
        runs.values().all(|r| r.status == RunStatus::Succeeded),
        "{runs:#?}"
    );
    let records = crm.standin.records();
    assert_eq!(records.len(), 8, "{records:#?}");
    assert!(records.iter().all(|r| r.creates == 1), "{records:#?}");
    let statuses: Vec<u16> = crm.standin.requests().iter().map(|r| r.status).collect();
    assert_eq!(&statuses[..2], &[429, 503], "{statuses:?}");
    app.cleanup().await;
}

#[tokio::test]
async fn records_an_answer_leaves_out_are_retried_and_never_taken_as_succeeded() {
    // Arrange: the five's batch is answered for its first record only (and writes nothing:
    // it is scripted).
    let (crm, mut app) = arrange(
        Provider::Salesforce,
        "create",
        json!({"match_fields": ["Email"]}),
        salesforce_mapping(),
    )
    .await;
    app.start_worker().await;
    let warm_up = warm_up(&app).await;
    crm.standin.set_faults(Faults {
        script: vec![ScriptedAnswer {
            status: 200,
            retry_after: None,
            body: Some(json!([{"id": "003SCRIPTED00000001", "success": true, "errors": []}])),
        }],
        ..Faults::default()
    });
    let emails = emails("short", 5);

    // Act
    let ids = publish(&app, &emails, &[]).await;
    let runs = finished(&app, 1 + ids.len(), Duration::from_secs(30)).await;

    // Assert: one batch call held all five; the four left out were looked up (nothing made)
    // and created one by one, each with its own record.
    assert_eq!(
        calls_to(&crm, "/composite/sobjects"),
        2,
        "the warm-up's and the five's"
    );
    let answered: Vec<&Run> = runs
        .values()
        .filter(|r| r.provider_id.as_deref() == Some("003SCRIPTED00000001"))
        .collect();
    assert_eq!(answered.len(), 1, "{runs:#?}");
    let records: Vec<_> = crm
        .standin
        .records()
        .into_iter()
        .filter(|r| r.fields["Email"] != warm_up.as_str())
        .collect();
    assert_eq!(records.len(), 4, "{records:#?}");
    for record in &records {
        let email = record.fields["Email"].as_str().expect("email");
        let id = &ids[emails.iter().position(|e| e == email).expect("an event's")];
        assert_eq!(runs[id].status, RunStatus::Succeeded);
        assert_eq!(runs[id].provider_id.as_deref(), Some(record.id.as_str()));
    }
    assert_eq!(
        calls_to(&crm, "/query"),
        4,
        "each left-out record was looked for"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_after_a_batch_s_answer_writes_nothing_twice() {
    // Arrange: five Salesforce creates that find their record after an earlier attempt.
    let (crm, mut app) = arrange(
        Provider::Salesforce,
        "create",
        json!({"match_fields": ["Email"]}),
        salesforce_mapping(),
    )
    .await;
    let emails = emails("killed", 5);
    let ids = publish(&app, &emails, &[]).await;

    // Act: the worker dies right after the batch's answer, before recording any run.
    let mut worker = appevents_command(&app.settings, &["worker"])
        .env("APPEVENTS__WORKER__CRASH_AFTER_PROVIDER_ANSWER", "true")
        .env("APPEVENTS__BATCHING__WINDOW", "300ms")
        .spawn()
        .expect("worker");
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker exits after the provider's answer")
        .expect("exit status");
    assert_eq!(status.code(), Some(137));
    // The five are usually admitted together and go out in one batch; on a loaded machine
    // the first may be admitted alone and go at once. Either way the crash follows a batch
    // call's answer, with what it made unrecorded.
    let made_before: Vec<String> = crm.standin.records().into_iter().map(|r| r.id).collect();
    assert!(!made_before.is_empty());
    assert!(
        app.all_runs()
            .await
            .iter()
            .all(|r| r.status == RunStatus::Running),
        "nothing recorded"
    );
    app.start_worker().await;
    let runs = finished(&app, ids.len(), Duration::from_secs(45)).await;

    // Assert: taken over, each run found its record or made it once; none was made twice.
    let records = crm.standin.records();
    assert_eq!(records.len(), 5, "{records:#?}");
    assert!(records.iter().all(|r| r.creates == 1), "{records:#?}");
    for (id, email) in ids.iter().zip(&emails) {
        assert_eq!(runs[id].status, RunStatus::Succeeded, "{:#?}", runs[id]);
        assert_eq!(runs[id].provider_id, record_id(&crm, email));
    }
    let found: Vec<&Run> = runs
        .values()
        .filter(|r| {
            r.provider_id
                .as_ref()
                .is_some_and(|id| made_before.contains(id))
        })
        .collect();
    assert_eq!(found.len(), made_before.len());
    assert!(found.iter().all(|r| r.claims == 2), "{found:#?}");
    app.cleanup().await;
}

#[tokio::test]
async fn events_of_one_contact_in_one_window_are_not_sent_in_one_batch() {
    // Arrange: HubSpot refuses a batch naming a contact twice; three of these seven events
    // are one contact's.
    let (crm, mut app) = arrange(
        Provider::Hubspot,
        "upsert-contact",
        json!({}),
        hubspot_mapping(),
    )
    .await;
    app.start_worker().await;
    warm_up(&app).await;
    let mut emails = emails("twice", 5);
    emails.push(emails[0].clone());
    emails.push(emails[0].clone());

    // Act
    let ids = publish(&app, &emails, &[]).await;
    let runs = finished(&app, 1 + ids.len(), Duration::from_secs(30)).await;

    // Assert: every run succeeded; the repeats went alone, none was refused.
    assert!(
        runs.values().all(|r| r.status == RunStatus::Succeeded),
        "{runs:#?}"
    );
    let records = crm.standin.records();
    assert_eq!(records.len(), 1 + 5, "{records:#?}");
    let repeated = records
        .iter()
        .find(|r| r.fields["email"] == emails[0].as_str())
        .expect("the repeated contact");
    assert_eq!(
        (repeated.creates, repeated.updates),
        (1, 2),
        "{repeated:#?}"
    );
    let statuses: Vec<u16> = crm.standin.requests().iter().map(|r| r.status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        calls_to(&crm, "/batch/upsert"),
        1 + 3,
        "the warm-up's; then one batch, two alone"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn batching_turned_off_for_an_action_sends_one_record_per_call() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::with_settings(|s| {
        s.batching.off = vec!["hubspot create-contact".into()];
    })
    .await;
    workflow(
        &app,
        &crm,
        Provider::Hubspot,
        "create-contact",
        json!({}),
        hubspot_mapping(),
    )
    .await;
    let ids = publish(&app, &emails("alone", 6), &[]).await;

    app.start_worker().await;
    let runs = finished(&app, ids.len(), Duration::from_secs(30)).await;

    assert!(runs.values().all(|r| r.status == RunStatus::Succeeded));
    assert_eq!(calls_to(&crm, "/crm/v3/objects/contacts"), 6);
    assert_eq!(calls_to(&crm, "/batch/create"), 0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_batch_that_finds_the_budget_spent_defers_its_runs_without_spending_retries() {
    // Arrange: one call per three seconds for the connection; a run waits 300 ms at most.
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::with_settings(|s| {
        s.batching.window = Duration::from_millis(100);
        s.rate_limits.max_wait = Duration::from_millis(300);
    })
    .await;
    let connection = workflow(
        &app,
        &crm,
        Provider::Hubspot,
        "upsert-contact",
        json!({}),
        hubspot_mapping(),
    )
    .await;
    appevents::catalog::connections::set_rate_limit(
        &app.pool,
        connection,
        None,
        Some("1/3s".parse().expect("limit")),
    )
    .await
    .expect("limit");
    app.start_worker().await;

    // Act: a first batch spends the budget; a second comes right after.
    let started = std::time::Instant::now();
    let first = publish(&app, &emails("first", 3), &[]).await;
    finished(&app, first.len(), Duration::from_secs(10)).await;
    let second = publish(&app, &emails("second", 3), &[]).await;

    // Assert: the second batch's runs were deferred, then made it, with no retry spent and
    // nothing dead-lettered; every call was a batch call, and no more calls were made than
    // the budget allowed in the time taken. (A loaded machine may split a batch: a run that
    // comes back from the held queue after its fellows goes in a call of its own.)
    let runs = finished(&app, first.len() + second.len(), Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    assert!(
        runs.values().all(|r| r.status == RunStatus::Succeeded),
        "{runs:#?}"
    );
    assert!(app.take_dead_letters().await.is_empty());
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("appevents_throttled_runs_total{provider=\"hubspot\",reason=\"budget\"}"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("appevents_retries_total"))
            .all(|l| l.ends_with(" 0")),
        "no retry was scheduled: {metrics}"
    );
    let calls = calls_to(&crm, "/batch/upsert");
    let allowed = 1 + (elapsed.as_secs_f64() / 3.0) as usize;
    assert!(
        (2..=allowed).contains(&calls),
        "six records in {calls} calls, {allowed} allowed in {elapsed:?}"
    );
    assert_eq!(crm.standin.requests().len(), calls, "only batch calls");
    assert_eq!(crm.standin.records().len(), 6);
    app.cleanup().await;
}
