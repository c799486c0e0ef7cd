//! Recovery from a worker killed with SIGKILL: its runs are taken over within seconds of its
//! death (claims follow the worker's liveness, renewed every third of a lease), and a run it
//! left is executed once: killed between the provider's answer and the record (the
//! `worker.crash_after_provider_answer` failpoint), no action makes a second record: each
//! create looks for what the killed attempt made (a Salesforce create by its match fields, a
//! HubSpot contact by email, a HubSpot company by its domain or `match_property`).

use std::time::{Duration, Instant};

use appevents::core::provider::Provider;
use appevents::pipeline::runs::{Run, RunStatus};
use appevents_standin::{self as standin, Faults, ScriptedAnswer};
use serde_json::{Value, json};
use uuid::Uuid;

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

/// A workflow of `action` on the stand-in for user "u", and the real worker run with the
/// crash failpoint on until it exits right after the provider's answer to `event_id`, before
/// recording it. Returns the stand-in, the app (no worker running) and the workflow id.
async fn crash_between_answer_and_record(
    provider: Provider,
    action: &str,
    options: Value,
    mapping: Value,
    event_id: &str,
) -> (standin::Running, TestApp, Uuid) {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let workflow = app
        .workflow("w", CONTACT_CREATED, provider, action, options, mapping)
        .await;
    let connection = app.connection("u", provider, &crm.url(), "token").await;
    app.subscribe("u", workflow.id, connection).await;
    app.publish(
        CONTACT_CREATED,
        "u",
        json!({"email": "once@example.com", "last_name": "Once"}),
        Some(event_id),
    )
    .await;

    let mut worker = appevents_command(&app.settings, &["worker"])
        .env("APPEVENTS__WORKER__CRASH_AFTER_PROVIDER_ANSWER", "true")
        .spawn()
        .expect("worker");
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker exits after the provider's answer")
        .expect("exit status");

    assert_eq!(status.code(), Some(137), "it exited at the failpoint");
    assert_eq!(crm.standin.records().len(), 1, "the provider acted once");
    let runs = app.runs(event_id).await;
    assert_eq!(runs[0].status, RunStatus::Running, "nothing recorded");
    (crm, app, workflow.id)
}

/// Takes the run over with a worker of its own and returns it once succeeded.
async fn take_over(app: &mut TestApp, event_id: &str) -> Run {
    app.start_worker().await;
    let runs = app.wait_for_runs(event_id, 1, RunStatus::Succeeded).await;
    runs[0].clone()
}

/// The stand-in's log: (method, path, status) of each request.
fn requests_made(crm: &standin::Running) -> Vec<(String, String, u16)> {
    crm.standin
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path, r.status))
        .collect()
}

fn assert_one_record_and_it_is_the_outcome(crm: &standin::Running, run: &Run) {
    let records = crm.standin.records();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0].creates, 1, "no duplicate: {records:#?}");
    assert_eq!(run.provider_id.as_deref(), Some(records[0].id.as_str()));
    assert_eq!(run.claims, 2, "{run:#?}");
}

#[tokio::test]
async fn a_salesforce_create_killed_after_the_answer_finds_its_record_instead_of_creating_another()
{
    let (crm, mut app, _) = crash_between_answer_and_record(
        Provider::Salesforce,
        "create",
        json!({"match_fields": ["Email"]}),
        json!({"Email": "{{payload.email}}", "LastName": "{{payload.last_name}}"}),
        "evt-sf-create",
    )
    .await;

    let run = take_over(&mut app, "evt-sf-create").await;

    assert_one_record_and_it_is_the_outcome(&crm, &run);
    let requests = crm.standin.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.method == "GET" && r.path.ends_with("/query") && r.status == 200),
        "looked up with SOQL: {requests:#?}"
    );
    assert_eq!(
        requests.iter().filter(|r| r.method == "POST").count(),
        1,
        "created once: {requests:#?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_salesforce_create_whose_duplicate_rule_matches_after_a_crash_takes_the_match() {
    // No match_fields: the org's duplicate rule is what prevents the second record.
    let (crm, mut app, _) = crash_between_answer_and_record(
        Provider::Salesforce,
        "create",
        json!({}),
        json!({"Email": "{{payload.email}}", "LastName": "{{payload.last_name}}"}),
        "evt-sf-duplicate",
    )
    .await;
    let made = crm.standin.records()[0].id.clone();
    crm.standin.set_faults(Faults {
        script: vec![ScriptedAnswer {
            status: 400,
            retry_after: None,
            body: Some(json!([{
                "duplicateResult": {
                    "allowSave": false,
                    "duplicateRule": "Standard_Contact_Duplicate_Rule",
                    "duplicateRuleEntityType": "Contact",
                    "errorMessage": "You're creating a duplicate record.",
                    "matchResults": [{
                        "entityType": "Contact",
                        "errors": [],
                        "matchEngine": "ExactMatchEngine",
                        "matchRecords": [{
                            "additionalInformation": [],
                            "fieldDiffs": [],
                            "matchConfidence": 100.0,
                            "record": {"attributes": {"type": "Contact"}, "Id": made}
                        }],
                        "rule": "Standard_Contact_Match_Rule_v1_1",
                        "size": 1,
                        "success": true
                    }]
                },
                "errorCode": "DUPLICATES_DETECTED",
                "message": "Use one of these records?"
            }])),
        }],
        ..Faults::default()
    });

    let run = take_over(&mut app, "evt-sf-duplicate").await;

    assert_one_record_and_it_is_the_outcome(&crm, &run);
    app.cleanup().await;
}

#[tokio::test]
async fn a_salesforce_upsert_killed_after_the_answer_updates_the_same_record() {
    let (crm, mut app, _) = crash_between_answer_and_record(
        Provider::Salesforce,
        "upsert",
        json!({"external_id_field": "External_Id__c"}),
        json!({"External_Id__c": "{{id}}", "Email": "{{payload.email}}", "LastName": "{{payload.last_name}}"}),
        "evt-sf-upsert",
    )
    .await;

    let run = take_over(&mut app, "evt-sf-upsert").await;

    assert_one_record_and_it_is_the_outcome(&crm, &run);
    app.cleanup().await;
}

#[tokio::test]
async fn a_hubspot_create_contact_killed_after_the_answer_finds_its_contact_instead_of_creating_another()
 {
    let (crm, mut app, _) = crash_between_answer_and_record(
        Provider::Hubspot,
        "create-contact",
        json!({}),
        json!({"email": "{{payload.email}}", "lastname": "{{payload.last_name}}"}),
        "evt-hs-create",
    )
    .await;

    let run = take_over(&mut app, "evt-hs-create").await;

    assert_one_record_and_it_is_the_outcome(&crm, &run);
    // Found by the search on its email since the first claim: neither created nor updated
    // again.
    assert_eq!(crm.standin.records()[0].updates, 0);
    let requests = requests_made(&crm);
    assert_eq!(
        requests,
        vec![
            // The first attempt went out in a batch (of one); the takeover runs alone.
            (
                "POST".into(),
                "/crm/v3/objects/contacts/batch/create".into(),
                201
            ),
            ("POST".into(), "/crm/v3/objects/contacts/search".into(), 200),
        ],
        "{requests:#?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_hubspot_create_company_killed_after_the_answer_finds_its_company_instead_of_creating_another()
 {
    // No match_property: the company's domain, which the mapping sets, identifies it.
    let (crm, mut app, _) = crash_between_answer_and_record(
        Provider::Hubspot,
        "create-company",
        json!({}),
        json!({"name": "{{payload.last_name}} Ltd", "domain": "once.example"}),
        "evt-hs-company",
    )
    .await;

    let run = take_over(&mut app, "evt-hs-company").await;

    assert_one_record_and_it_is_the_outcome(&crm, &run);
    assert_eq!(crm.standin.records()[0].object, "companies");
    let requests = requests_made(&crm);
    assert_eq!(
        requests,
        vec![
            ("POST".into(), "/crm/v3/objects/companies".into(), 201),
            (
                "POST".into(),
                "/crm/v3/objects/companies/search".into(),
                200
            ),
        ],
        "found by the search on its domain since the first claim, not created again: {requests:#?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_hubspot_create_company_killed_after_the_answer_is_found_by_its_match_property() {
    // No domain mapped: `match_property` names what identifies the company.
    let (crm, mut app, _) = crash_between_answer_and_record(
        Provider::Hubspot,
        "create-company",
        json!({"match_property": "name"}),
        json!({"name": "{{payload.last_name}} Ltd"}),
        "evt-hs-company-name",
    )
    .await;

    let run = take_over(&mut app, "evt-hs-company-name").await;

    assert_one_record_and_it_is_the_outcome(&crm, &run);
    let posts: Vec<String> = crm
        .standin
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.path)
        .collect();
    assert_eq!(
        posts,
        [
            "/crm/v3/objects/companies",
            "/crm/v3/objects/companies/search"
        ]
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_hubspot_upsert_killed_after_the_answer_updates_the_same_contact() {
    let (crm, mut app, _) = crash_between_answer_and_record(
        Provider::Hubspot,
        "upsert-contact",
        json!({}),
        json!({"email": "{{payload.email}}", "lastname": "{{payload.last_name}}"}),
        "evt-hs-upsert",
    )
    .await;

    let run = take_over(&mut app, "evt-hs-upsert").await;

    assert_one_record_and_it_is_the_outcome(&crm, &run);
    app.cleanup().await;
}
