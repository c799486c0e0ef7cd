//! Workflows of several steps against the stand-in CRM: later steps read earlier outputs,
//! conditions (true, false, an evaluation error), `for_each` with a partial failure under
//! `on_error: continue`, and a worker killed between step 2 and step 3 whose run resumes at
//! step 3 without repeating a write.

use std::time::Duration;

use appevents::catalog::workflow_files;
use appevents::catalog::workflows::{self, NewWorkflow, StepDefinition};
use appevents::core::provider::Provider;
use appevents::pipeline::run_steps::{self, StepStatus};
use appevents::pipeline::runs::RunStatus;
use appevents_standin as standin;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{CONTACT_CREATED, TestApp, appevents_command};

pub fn steps(value: Value) -> Vec<StepDefinition> {
    serde_json::from_value(value).expect("step definitions")
}

/// An account, a contact of that account, and a task about that contact: each write reads
/// the id the one before it made.
fn account_contact_task() -> Vec<StepDefinition> {
    steps(json!([
        {"name": "account", "action": "create", "options": {"sobject": "Account"},
         "mapping": {"Name": "{{payload.company}}"}},
        {"name": "contact", "action": "create", "options": {"match_fields": ["Email"]},
         "mapping": {"Email": "{{payload.email}}", "LastName": "{{payload.last_name}}",
                     "AccountId": "{{steps.account.id}}"}},
        {"name": "task", "action": "create", "options": {"sobject": "Task"},
         "mapping": {"Subject": "Welcome {{payload.last_name}}", "WhoId": "{{steps.contact.id}}"}}
    ]))
}

/// A Salesforce workflow of `steps` (and condition `when`) on for user "u".
async fn chain(app: &TestApp, crm: &str, when: Option<&str>, steps: Vec<StepDefinition>) -> Uuid {
    chain_of(app, Provider::Salesforce, crm, when, steps).await
}

/// A workflow of `provider` of `steps` (and condition `when`) on for user "u".
pub async fn chain_of(
    app: &TestApp,
    provider: Provider,
    crm: &str,
    when: Option<&str>,
    steps: Vec<StepDefinition>,
) -> Uuid {
    app.app_event(CONTACT_CREATED).await;
    let workflow = workflows::create(
        &app.pool,
        &NewWorkflow {
            name: "chain".into(),
            event: CONTACT_CREATED.into(),
            provider,
            action: String::new(),
            options: json!({}),
            mapping: json!({}),
            when: when.map(str::to_owned),
            steps,
        },
    )
    .await
    .expect("workflow");
    let connection = app.connection("u", provider, crm, "token").await;
    app.subscribe("u", workflow.id, connection).await;
    workflow.id
}

/// The stand-in and an app whose worker runs the workflow of `steps` for user "u".
async fn running(when: Option<&str>, steps: Vec<StepDefinition>) -> (standin::Running, TestApp) {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    chain(&app, &crm.url(), when, steps).await;
    app.start_worker().await;
    (crm, app)
}

fn payload() -> Value {
    json!({"email": "chain@example.com", "last_name": "Chain", "company": "Acme", "plan": "pro"})
}

#[tokio::test]
async fn each_step_reads_the_outputs_of_the_steps_before_it() {
    let (crm, app) = running(None, account_contact_task()).await;

    app.publish(CONTACT_CREATED, "u", payload(), Some("evt-chain"))
        .await;
    let runs = app
        .wait_for_runs("evt-chain", 1, RunStatus::Succeeded)
        .await;

    let records = crm.standin.records();
    let of = |object: &str| {
        records
            .iter()
            .find(|r| r.object == object)
            .unwrap_or_else(|| panic!("a {object}: {records:#?}"))
    };
    let (account, contact, task) = (of("Account"), of("Contact"), of("Task"));
    assert_eq!(contact.fields["AccountId"], json!(account.id));
    assert_eq!(task.fields["WhoId"], json!(contact.id));
    assert_eq!(task.fields["Subject"], json!("Welcome Chain"));
    assert_eq!(runs[0].provider_id.as_deref(), Some(task.id.as_str()));

    let shown = run_steps::show(&app.pool, runs[0].id).await.expect("show");
    let names: Vec<&str> = shown.steps.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(names, ["account", "contact", "task"]);
    for step in &shown.steps {
        assert_eq!(
            (step.status, step.attempts),
            (StepStatus::Succeeded, 1),
            "{step:#?}"
        );
        let request = step.request.as_ref().expect("request summary");
        assert_eq!(request["method"], json!("POST"));
        assert!(step.started_at <= step.finished_at);
    }
    assert_eq!(
        shown.steps[1].output.as_ref().expect("output")["id"],
        json!(contact.id)
    );
    let shown_json = serde_json::to_string(&shown).expect("json");
    assert!(
        !shown_json.contains("token"),
        "no credentials shown: {shown_json}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_workflow_runs_only_when_its_condition_holds() {
    let (crm, app) = running(
        Some(r#"payload.plan == "pro" && payload.email != """#),
        account_contact_task(),
    )
    .await;

    let mut free = payload();
    free["plan"] = json!("free");
    app.publish(CONTACT_CREATED, "u", free, Some("evt-free"))
        .await;
    app.wait_for_runs("evt-free", 1, RunStatus::Succeeded).await;
    assert!(crm.standin.records().is_empty(), "false: nothing written");

    app.publish(CONTACT_CREATED, "u", payload(), Some("evt-pro"))
        .await;
    app.wait_for_runs("evt-pro", 1, RunStatus::Succeeded).await;
    assert_eq!(crm.standin.records().len(), 3, "true: every step ran");
    app.cleanup().await;
}

#[tokio::test]
async fn a_step_whose_condition_is_false_is_skipped_and_the_next_reads_the_earlier_output() {
    let definition = steps(json!([
        {"name": "account", "action": "create", "options": {"sobject": "Account"},
         "mapping": {"Name": "{{payload.company}}"}},
        {"name": "vip", "action": "create", "options": {"sobject": "Task"},
         "when": "payload.plan == \"enterprise\"", "mapping": {"Subject": "VIP"}},
        {"name": "contact", "action": "create",
         "when": "steps.account.success && steps.vip == null",
         "mapping": {"LastName": "{{payload.last_name}}", "AccountId": "{{steps.account.id}}"}}
    ]));
    let (crm, app) = running(None, definition).await;

    app.publish(CONTACT_CREATED, "u", payload(), Some("evt-skip"))
        .await;
    let runs = app.wait_for_runs("evt-skip", 1, RunStatus::Succeeded).await;

    let objects: Vec<String> = crm
        .standin
        .records()
        .iter()
        .map(|r| r.object.clone())
        .collect();
    assert_eq!(objects, ["Account", "Contact"]);
    let shown = run_steps::show(&app.pool, runs[0].id).await.expect("show");
    let statuses: Vec<StepStatus> = shown.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Succeeded,
            StepStatus::Skipped,
            StepStatus::Succeeded
        ]
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_condition_that_fails_on_the_event_dead_letters_the_run_with_the_reason() {
    let (crm, app) = running(Some("payload.age >= 18"), account_contact_task()).await;

    let mut text_age = payload();
    text_age["age"] = json!("eighteen");
    app.publish(CONTACT_CREATED, "u", text_age, Some("evt-bad-age"))
        .await;
    let runs = app.wait_for_runs("evt-bad-age", 1, RunStatus::Dead).await;

    let letters = app.dead_letters_until(1, Duration::from_secs(10)).await;
    let reason = letters[0].header("x-appevents-reason").expect("reason");
    assert!(
        reason.contains("condition \"payload.age >= 18\" failed"),
        "{reason}"
    );
    assert_eq!(runs[0].attempts, 0, "no provider call: {runs:#?}");
    assert!(crm.standin.records().is_empty());
    // The worker goes on: the next event runs.
    let mut adult = payload();
    adult["age"] = json!(30);
    app.publish(CONTACT_CREATED, "u", adult, Some("evt-after"))
        .await;
    app.wait_for_runs("evt-after", 1, RunStatus::Succeeded)
        .await;
    app.cleanup().await;
}

#[tokio::test]
async fn for_each_runs_per_element_and_on_error_continue_keeps_going_past_a_failure() {
    let definition = steps(json!([
        {"name": "contacts", "action": "create", "for_each": "payload.people",
         "on_error": "continue",
         "mapping": {"Email": "{{item.email}}", "LastName": "{{item.last_name}}"}},
        {"name": "note", "action": "create", "options": {"sobject": "Task"},
         "mapping": {"Subject": "first: {{steps.contacts.0.id}}, third: {{steps.contacts.2.id}}"}}
    ]));
    let (crm, app) = running(None, definition).await;

    let people = json!({"people": [
        {"email": "a@example.com", "last_name": "A"},
        {"email": "b@example.com"},
        {"email": "c@example.com", "last_name": "C"}
    ]});
    app.publish(CONTACT_CREATED, "u", people, Some("evt-each"))
        .await;
    let runs = app.wait_for_runs("evt-each", 1, RunStatus::Succeeded).await;

    let records = crm.standin.records();
    let contacts: Vec<&str> = records
        .iter()
        .filter(|r| r.object == "Contact")
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(
        contacts.len(),
        2,
        "the element without LastName failed: {records:#?}"
    );
    let note = records.iter().find(|r| r.object == "Task").expect("note");
    assert_eq!(
        note.fields["Subject"],
        json!(format!("first: {}, third: {}", contacts[0], contacts[1]))
    );
    let shown = run_steps::show(&app.pool, runs[0].id).await.expect("show");
    let elements: Vec<(Option<u32>, StepStatus)> = shown
        .steps
        .iter()
        .filter(|s| s.step == "contacts")
        .map(|s| (s.item, s.status))
        .collect();
    assert_eq!(
        elements,
        [
            (Some(0), StepStatus::Succeeded),
            (Some(1), StepStatus::Failed),
            (Some(2), StepStatus::Succeeded)
        ]
    );
    let failed = shown
        .steps
        .iter()
        .find(|s| s.status == StepStatus::Failed)
        .expect("failed");
    assert!(
        failed
            .error
            .as_ref()
            .expect("error")
            .to_string()
            .contains("REQUIRED_FIELD_MISSING"),
        "{failed:#?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_for_each_over_more_than_a_hundred_elements_fails_permanently() {
    let definition = steps(json!([
        {"name": "contacts", "action": "create", "for_each": "payload.people",
         "mapping": {"LastName": "{{item}}"}}
    ]));
    let (crm, app) = running(None, definition).await;

    let people: Vec<String> = (0..101).map(|i| format!("p{i}")).collect();
    app.publish(
        CONTACT_CREATED,
        "u",
        json!({"people": people}),
        Some("evt-many"),
    )
    .await;
    app.wait_for_runs("evt-many", 1, RunStatus::Dead).await;

    let letters = app.dead_letters_until(1, Duration::from_secs(10)).await;
    let reason = letters[0].header("x-appevents-reason").expect("reason");
    assert!(
        reason.contains("has 101 elements, more than 100"),
        "{reason}"
    );
    assert!(crm.standin.records().is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_between_step_2_and_step_3_resumes_at_step_3_and_repeats_no_write() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    let workflow = chain(&app, &crm.url(), None, account_contact_task()).await;
    app.publish(CONTACT_CREATED, "u", payload(), Some("evt-killed"))
        .await;

    let mut worker = appevents_command(&app.settings, &["worker"])
        .env("APPEVENTS__WORKER__CRASH_AFTER_STEP", "contact")
        .spawn()
        .expect("worker");
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker exits after step 2")
        .expect("exit status");
    assert_eq!(status.code(), Some(137), "it exited at the failpoint");
    let objects: Vec<String> = crm
        .standin
        .records()
        .iter()
        .map(|r| r.object.clone())
        .collect();
    assert_eq!(
        objects,
        ["Account", "Contact"],
        "steps 1 and 2 ran, step 3 did not"
    );

    app.start_worker().await;
    let runs = app
        .wait_for_runs("evt-killed", 1, RunStatus::Succeeded)
        .await;

    let records = crm.standin.records();
    assert_eq!(records.len(), 3, "{records:#?}");
    assert!(records.iter().all(|r| r.creates == 1), "{records:#?}");
    let posts = crm
        .standin
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 3, "each write sent once");
    assert_eq!(runs[0].workflow_id, workflow);
    assert_eq!(runs[0].claims, 2, "{runs:#?}");
    let shown = run_steps::show(&app.pool, runs[0].id).await.expect("show");
    let attempts: Vec<(&str, i32)> = shown
        .steps
        .iter()
        .map(|s| (s.step.as_str(), s.attempts))
        .collect();
    assert_eq!(attempts, [("account", 1), ("contact", 1), ("task", 1)]);
    let task = records.iter().find(|r| r.object == "Task").expect("task");
    let contact = records
        .iter()
        .find(|r| r.object == "Contact")
        .expect("contact");
    assert_eq!(
        task.fields["WhoId"],
        json!(contact.id),
        "step 3 read step 2's recorded output"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn bad_definitions_are_refused_in_one_line_by_the_cli_and_with_400_by_the_api() {
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    // `workflow create` of a workflow named w for Contact Created, with `more` arguments.
    let create = |more: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec![
            "workflow",
            "create",
            "--name",
            "w",
            "--event",
            CONTACT_CREATED,
        ];
        args.extend_from_slice(more);
        args
    };
    let bad_steps = r#"[{"name":"find","action":"create","mapping":{"LastName":"{{steps.create.id}}"}},{"name":"create","action":"create","mapping":{}}]"#;
    let (code, _, err) = crate::cli::run(
        &app,
        &create(&["--provider", "salesforce", "--steps", bad_steps]),
    )
    .await;
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("step find: mapping: {{steps.create.id}} reads step create, which does not run before this one"),
        "{err}"
    );
    let hubspot = ["--provider", "hubspot", "--action", "create-contact"];
    let bad_when = [
        &hubspot[..],
        &["--mapping", "{}", "--when", "payload.plan =="],
    ]
    .concat();
    let (code, _, err) = crate::cli::run(&app, &create(&bad_when)).await;
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("when: \"payload.plan ==\" is not a valid CEL expression"),
        "{err}"
    );
    // Today's flags still make a one-step workflow, now with a condition.
    let good = [
        &hubspot[..],
        &[
            "--mapping",
            r#"{"email":"{{payload.email}}"}"#,
            "--when",
            r#"payload.plan == "pro""#,
        ],
    ]
    .concat();
    let id = crate::cli::ok(&app, &create(&good)).await;
    let stored = workflows::get(&app.pool, id.parse().expect("id"))
        .await
        .expect("get");
    assert_eq!(
        stored.condition.as_deref(),
        Some(r#"payload.plan == "pro""#)
    );
    assert_eq!(stored.steps.len(), 1);

    let server = crate::support::ServerHandle::start(&app.settings).await;
    let (status, body) = crate::api::call(
        &server,
        reqwest::Method::POST,
        "/v1/workflows",
        Some(json!({"name": "api", "event": CONTACT_CREATED, "provider": "salesforce",
                    "steps": [{"name": "a", "action": "create", "when": "steps.zz.id == 1", "mapping": {}}]})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains(
            "step a: when: \"steps.zz.id == 1\" reads step zz, which the workflow does not have"
        )),
        "{body}"
    );
    let (status, body) = crate::api::call(
        &server,
        reqwest::Method::POST,
        "/v1/workflows",
        Some(
            json!({"name": "api", "event": CONTACT_CREATED, "provider": "salesforce",
                    "when": "payload.plan == \"pro\"", "steps": account_contact_task()}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["steps"].as_array().map(Vec::len), Some(3), "{body}");
    for file in [
        "salesforce-find-or-create.yaml",
        "hubspot-find-or-create.json",
    ] {
        let (status, body) = crate::api::call(
            &server,
            reqwest::Method::POST,
            "/v1/workflows/apply",
            Some(example_file(file)),
        )
        .await;
        assert_eq!(status, 200, "{file} as the API takes it: {body}");
        assert_eq!(body["workflows"][0]["change"], "created", "{body}");
    }
    assert_eq!(body["when"], json!("payload.plan == \"pro\""));
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_api_shows_a_run_with_its_steps_to_its_user_only() {
    let (_crm, app) = running(None, account_contact_task()).await;
    app.publish(CONTACT_CREATED, "u", payload(), Some("evt-api"))
        .await;
    let runs = app.wait_for_runs("evt-api", 1, RunStatus::Succeeded).await;
    let server = crate::support::ServerHandle::start(&app.settings).await;

    let path = format!("/v1/users/u/runs/{}", runs[0].id);
    let (status, body) = crate::api::call(&server, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], json!("succeeded"));
    let steps = body["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 3, "{body}");
    assert_eq!(steps[2]["step"], json!("task"));
    assert_eq!(steps[2]["attempts"], json!(1));
    assert!(
        steps[2]["request"]["url"]
            .as_str()
            .is_some_and(|u| u.contains("/sobjects/Task")),
        "{body}"
    );
    assert!(!body.to_string().contains("token"), "{body}");

    let other = format!("/v1/users/someone-else/runs/{}", runs[0].id);
    let (status, _) = crate::api::call(&server, reqwest::Method::GET, &other, None).await;
    assert_eq!(status, 404);
    server.stop().await;
    app.cleanup().await;
}

/// An example file of examples/workflows/, read as `workflow apply` reads it, as JSON.
pub fn example_file(file: &str) -> Value {
    let path = format!("{}/examples/workflows/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("example file");
    let format = workflow_files::Format::of(file).expect("a workflow file's extension");
    let document = workflow_files::parse(file, &text, format).expect("a valid example");
    serde_json::to_value(document.file).expect("JSON")
}
