//! The actions a step can take, against the stand-in CRM: Salesforce query (values as
//! escaped literals), create, update by id, upsert by external id; HubSpot search, create,
//! update and upsert a contact, create a company, associate the two; an HTTP request whose
//! JSON answer later steps read. The find-or-create examples in examples/workflows/ run as
//! they are.

use appevents::core::provider::Provider;
use appevents::pipeline::run_steps::{self, StepStatus};
use appevents::pipeline::runs::RunStatus;
use appevents_standin as standin;
use serde_json::{Value, json};
use wiremock::matchers::{body_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::steps::{chain_of, steps};
use crate::support::{CONTACT_CREATED, TestApp};

/// An example workflow file, read as `workflow apply` reads it: its condition and steps.
fn example(file: &str) -> (Option<String>, Value) {
    let definition = crate::steps::example_file(file);
    let when = definition["when"].as_str().map(str::to_owned);
    (when, definition["steps"].clone())
}

async fn running_example(provider: Provider, file: &str) -> (standin::Running, TestApp) {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    let (when, definition) = example(file);
    chain_of(
        &app,
        provider,
        &crm.url(),
        when.as_deref(),
        steps(definition),
    )
    .await;
    app.start_worker().await;
    (crm, app)
}

fn statuses(shown: &run_steps::RunWithSteps) -> Vec<(String, StepStatus)> {
    shown
        .steps
        .iter()
        .map(|s| (s.step.clone(), s.status))
        .collect()
}

fn step(name: &str, status: StepStatus) -> (String, StepStatus) {
    (name.to_owned(), status)
}

#[tokio::test]
async fn salesforce_find_or_create_creates_once_then_updates_what_it_found() {
    let (crm, app) = running_example(Provider::Salesforce, "salesforce-find-or-create.yaml").await;
    let ada = json!({"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"});

    app.publish(CONTACT_CREATED, "u", ada.clone(), Some("evt-1"))
        .await;
    let first = app.wait_for_runs("evt-1", 1, RunStatus::Succeeded).await;
    let mut renamed = ada.clone();
    renamed["last_name"] = json!("King");
    app.publish(CONTACT_CREATED, "u", renamed, Some("evt-2"))
        .await;
    let second = app.wait_for_runs("evt-2", 1, RunStatus::Succeeded).await;

    let records = crm.standin.records();
    assert_eq!(records.len(), 1, "one contact: {records:#?}");
    assert_eq!((records[0].creates, records[0].updates), (1, 1));
    assert_eq!(records[0].fields["LastName"], json!("King"));
    let shown = run_steps::show(&app.pool, first[0].id).await.expect("show");
    assert_eq!(
        statuses(&shown),
        [
            step("find", StepStatus::Succeeded),
            step("create", StepStatus::Succeeded),
            step("update", StepStatus::Skipped)
        ]
    );
    assert_eq!(
        shown.steps[0].output.as_ref().expect("output")["totalSize"],
        json!(0)
    );
    let shown = run_steps::show(&app.pool, second[0].id)
        .await
        .expect("show");
    assert_eq!(
        statuses(&shown),
        [
            step("find", StepStatus::Succeeded),
            step("create", StepStatus::Skipped),
            step("update", StepStatus::Succeeded)
        ]
    );
    assert_eq!(
        second[0].provider_id.as_deref(),
        Some(records[0].id.as_str())
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_soql_value_stays_a_literal_whatever_it_holds() {
    let (crm, app) = running_example(Provider::Salesforce, "salesforce-find-or-create.yaml").await;
    app.publish(
        CONTACT_CREATED,
        "u",
        json!({"email": "someone@example.com", "last_name": "Someone"}),
        Some("evt-someone"),
    )
    .await;
    app.wait_for_runs("evt-someone", 1, RunStatus::Succeeded)
        .await;

    // Spliced into the query, this email would make it `Email = 'x' OR Name != ''`, which
    // finds the contact above and updates it.
    let hostile = "x' OR Name != '";
    app.publish(
        CONTACT_CREATED,
        "u",
        json!({"email": hostile, "last_name": "Hostile"}),
        Some("evt-hostile"),
    )
    .await;
    let runs = app
        .wait_for_runs("evt-hostile", 1, RunStatus::Succeeded)
        .await;

    let shown = run_steps::show(&app.pool, runs[0].id).await.expect("show");
    assert_eq!(
        shown.steps[0].output.as_ref().expect("output")["totalSize"],
        json!(0)
    );
    let url = shown.steps[0].request.as_ref().expect("request")["url"]
        .as_str()
        .expect("url")
        .to_owned();
    assert!(
        url.contains("Email%20%3D%20%27x%5C%27%20OR%20Name%20%21%3D%20%5C%27%27"),
        "the value is one escaped literal: {url}"
    );
    let records = crm.standin.records();
    assert_eq!(
        records.len(),
        2,
        "a second contact, the first untouched: {records:#?}"
    );
    assert_eq!(records[0].updates, 0);
    assert_eq!(records[1].fields["Email"], json!(hostile));
    app.cleanup().await;
}

#[tokio::test]
async fn a_soql_reference_inside_quotes_or_a_query_that_is_not_a_select_is_refused() {
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let refused = |soql: &str| {
        let steps = steps(json!([{"name": "find", "action": "query", "options": {"soql": soql}}]));
        appevents::catalog::workflows::validate("w", Provider::Salesforce, None, &steps)
            .expect_err(soql)
            .to_string()
    };
    let err = refused("SELECT Id FROM Contact WHERE Email = '{{payload.email}}'");
    assert!(err.contains("renders as a quoted literal itself"), "{err}");
    let err = refused("DELETE FROM Contact");
    assert!(err.contains("must be a SELECT query"), "{err}");
    app.cleanup().await;
}

#[tokio::test]
async fn salesforce_upsert_by_external_id_in_a_chain_reads_an_earlier_output() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    let definition = steps(json!([
        {"name": "account", "action": "upsert",
         "options": {"sobject": "Account", "external_id_field": "Ext_Id__c"},
         "mapping": {"Ext_Id__c": "{{payload.company_id}}", "Name": "{{payload.company}}"}},
        {"name": "contact", "action": "upsert",
         "options": {"external_id_field": "Ext_Id__c"},
         "mapping": {"Ext_Id__c": "{{payload.email}}", "LastName": "{{payload.last_name}}",
                     "AccountId": "{{steps.account.id}}"}}
    ]));
    chain_of(&app, Provider::Salesforce, &crm.url(), None, definition).await;
    app.start_worker().await;
    let payload = json!({"company_id": "acme-1", "company": "Acme", "email": "u@acme.test", "last_name": "U"});

    app.publish(CONTACT_CREATED, "u", payload.clone(), Some("evt-a"))
        .await;
    app.wait_for_runs("evt-a", 1, RunStatus::Succeeded).await;
    app.publish(CONTACT_CREATED, "u", payload, Some("evt-b"))
        .await;
    app.wait_for_runs("evt-b", 1, RunStatus::Succeeded).await;

    let records = crm.standin.records();
    assert_eq!(records.len(), 2, "{records:#?}");
    let account = records
        .iter()
        .find(|r| r.object == "Account")
        .expect("account");
    let contact = records
        .iter()
        .find(|r| r.object == "Contact")
        .expect("contact");
    assert_eq!((account.creates, account.updates), (1, 1));
    assert_eq!(contact.fields["AccountId"], json!(account.id));
    app.cleanup().await;
}

#[tokio::test]
async fn hubspot_find_or_create_with_a_company_and_their_association() {
    let (crm, app) = running_example(Provider::Hubspot, "hubspot-find-or-create.json").await;
    let grace = json!({"email": "grace@example.com", "first_name": "Grace", "last_name": "Hopper", "company": "Navy"});

    app.publish(CONTACT_CREATED, "u", grace.clone(), Some("evt-1"))
        .await;
    let first = app.wait_for_runs("evt-1", 1, RunStatus::Succeeded).await;
    let mut again = grace.clone();
    again["first_name"] = json!("Amazing Grace");
    app.publish(CONTACT_CREATED, "u", again, Some("evt-2"))
        .await;
    let second = app.wait_for_runs("evt-2", 1, RunStatus::Succeeded).await;

    let records = crm.standin.records();
    let contacts: Vec<_> = records.iter().filter(|r| r.object == "contacts").collect();
    let companies: Vec<_> = records.iter().filter(|r| r.object == "companies").collect();
    assert_eq!(contacts.len(), 1, "found, not created again: {records:#?}");
    assert_eq!((contacts[0].creates, contacts[0].updates), (1, 1));
    assert_eq!(contacts[0].fields["firstname"], json!("Amazing Grace"));
    assert_eq!(
        companies.len(),
        2,
        "create-company makes one per run: {records:#?}"
    );
    assert_eq!(
        contacts[0].fields["associatedcompanyid"],
        json!(companies[1].id),
        "associated with the latest company"
    );
    let shown = run_steps::show(&app.pool, first[0].id).await.expect("show");
    assert_eq!(
        statuses(&shown),
        [
            step("find", StepStatus::Succeeded),
            step("create", StepStatus::Succeeded),
            step("update", StepStatus::Skipped),
            step("company", StepStatus::Succeeded),
            step("associate", StepStatus::Succeeded)
        ]
    );
    let association = shown.steps[4].output.as_ref().expect("output");
    assert_eq!(association["status"], json!("COMPLETE"));
    let shown = run_steps::show(&app.pool, second[0].id)
        .await
        .expect("show");
    assert_eq!(shown.steps[1].status, StepStatus::Skipped);
    assert_eq!(shown.steps[2].status, StepStatus::Succeeded);
    let requests = crm.standin.requests();
    assert!(
        requests.iter().any(|r| r.method == "PUT"
            && r.path.contains(&format!(
                "/crm/v4/objects/contact/{}/associations/default/company/",
                contacts[0].id
            ))),
        "{requests:#?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn hubspot_upsert_and_a_missing_id_fail_as_they_should() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    let definition = steps(json!([
        {"name": "contact", "action": "upsert-contact",
         "mapping": {"email": "{{payload.email}}", "lastname": "{{payload.last_name}}"}},
        {"name": "touch", "action": "update-contact", "options": {"id": "{{steps.nothing.id}}"},
         "on_error": "continue", "mapping": {"lastname": "x"}}
    ]));
    // `steps.nothing` is not a step: refused when defined.
    let refused =
        appevents::catalog::workflows::validate("w", Provider::Hubspot, None, &definition)
            .expect_err("refused")
            .to_string();
    assert!(refused.contains("step touch: options.id"), "{refused}");

    let definition = steps(json!([
        {"name": "contact", "action": "upsert-contact",
         "mapping": {"email": "{{payload.email}}", "lastname": "{{payload.last_name}}"}},
        {"name": "touch", "action": "update-contact", "options": {"id": "{{payload.hubspot_id}}"},
         "mapping": {"lastname": "x"}}
    ]));
    chain_of(&app, Provider::Hubspot, &crm.url(), None, definition).await;
    app.start_worker().await;
    app.publish(
        CONTACT_CREATED,
        "u",
        json!({"email": "up@example.com", "last_name": "Up"}),
        Some("evt-up"),
    )
    .await;
    let runs = app.wait_for_runs("evt-up", 1, RunStatus::Dead).await;

    let records = crm.standin.records();
    assert_eq!(
        records.len(),
        1,
        "the upsert made the contact: {records:#?}"
    );
    let error = runs[0].last_error.as_ref().expect("error").to_string();
    assert!(
        error.contains("step touch: option id rendered empty"),
        "{error}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn an_http_request_s_json_answer_is_what_later_steps_read() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/plans/ada"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"plan": "gold", "seats": 3})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/welcome"))
        .and(body_json(
            json!({"plan": "gold", "seats": 3, "user": "ada"}),
        ))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": 42})))
        .expect(1)
        .mount(&server)
        .await;
    let mut app = TestApp::new().await;
    let definition = steps(json!([
        {"name": "plan", "action": "request",
         "options": {"method": "GET", "url": "/plans/{{payload.user}}"}},
        {"name": "welcome", "action": "request", "when": "steps.plan.plan == \"gold\"",
         "options": {"url": "/welcome"},
         "mapping": {"plan": "{{steps.plan.plan}}", "seats": "{{steps.plan.seats}}", "user": "{{payload.user}}"}}
    ]));
    chain_of(&app, Provider::Http, &server.uri(), None, definition).await;
    app.start_worker().await;

    app.publish(
        CONTACT_CREATED,
        "u",
        json!({"user": "ada"}),
        Some("evt-http"),
    )
    .await;
    let runs = app.wait_for_runs("evt-http", 1, RunStatus::Succeeded).await;

    assert_eq!(runs[0].provider_id.as_deref(), Some("42"));
    let shown = run_steps::show(&app.pool, runs[0].id).await.expect("show");
    assert_eq!(
        shown.steps[0].output,
        Some(json!({"plan": "gold", "seats": 3}))
    );
    server.verify().await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_dry_run_of_a_chain_renders_every_step_sends_reads_or_everything() {
    let (crm, app) = running_example(Provider::Salesforce, "salesforce-find-or-create.yaml").await;
    let id = appevents::catalog::workflows::list(&app.pool, None, None)
        .await
        .expect("list")[0]
        .id
        .to_string();
    let test = |more: &[&str]| {
        let mut args = vec!["workflow", "test", id.as_str(), "--user", "u"];
        args.extend_from_slice(more);
        args.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };
    let run = |args: Vec<String>| {
        let app = &app;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::cli::run(app, &args).await
        }
    };

    let (code, out, err) = run(test(&[])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("step 1/3 find: rendered"), "{out}");
    assert!(out.contains("GET http://127.0.0.1:"), "{out}");
    assert!(
        out.contains("Email%20%3D%20%27ada%40example.com%27"),
        "{out}"
    );
    assert!(out.contains("step 2/3 create: rendered"), "{out}");
    assert!(out.contains("is not evaluated"), "{out}");
    assert!(out.contains("step 3/3 update: unknown"), "{out}");
    assert!(
        out.contains("authorization: Bearer ****"),
        "secret masked: {out}"
    );
    assert!(crm.standin.requests().is_empty(), "nothing sent");

    let (code, out, err) = run(test(&["--send-reads", "--json"])).await;
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).expect("JSON");
    let outcomes: Vec<&str> = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["outcome"].as_str().expect("outcome"))
        .collect();
    assert_eq!(outcomes, ["sent", "rendered", "skipped"], "{report}");
    assert_eq!(report["steps"][0]["output"]["totalSize"], json!(0));
    assert_eq!(
        report["steps"][1]["request"]["body"]["Email"],
        json!("ada@example.com")
    );
    let methods: Vec<String> = crm
        .standin
        .requests()
        .iter()
        .map(|r| r.method.clone())
        .collect();
    assert_eq!(methods, ["GET"], "only the read was sent");

    let (code, out, err) = run(test(&["--send"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("step 2/3 create: sent"), "{out}");
    assert!(out.contains("step 3/3 update: skipped"), "{out}");
    assert_eq!(crm.standin.records().len(), 1, "every step sent once");
    assert!(app.all_runs().await.is_empty(), "a dry run records no run");
    app.cleanup().await;
}
