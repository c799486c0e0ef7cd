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
async fn a_bad_http_step_is_refused_in_one_line_naming_the_step_and_the_field() {
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let steps = |options: Value| {
        json!([
            {"name": "create", "action": "create-contact", "mapping": {"email": "{{payload.email}}"}},
            {"name": "score", "action": "http.request", "options": options,
             "mapping": {"contact": "{{steps.create.id}}"}}
        ])
        .to_string()
    };

    let relative = steps(json!({"url": "/scores"}));
    let (code, _, err) = crate::cli::run(
        &app,
        &[
            "workflow",
            "create",
            "--name",
            "w",
            "--event",
            CONTACT_CREATED,
            "--provider",
            "hubspot",
            "--steps",
            &relative,
        ],
    )
    .await;
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("step score: action: option url \"/scores\" is not absolute"),
        "{err}"
    );

    let server = crate::support::ServerHandle::start(&app.settings).await;
    for (options, expected) in [
        (
            json!({"url": "https://scores.example/x", "body": "{}"}),
            "step score: action: hubspot http.request does not take option body: it takes only url, method, headers",
        ),
        (
            json!({"url": "https://scores.example/x", "method": "FETCH"}),
            "step score: action: option method \"FETCH\": expected GET, POST, PUT, PATCH or DELETE",
        ),
        (
            json!({"url": "https://scores.example/{{steps.later.id}}"}),
            "step score: options.url: {{steps.later.id}} reads step later, which the workflow does not have",
        ),
    ] {
        let (status, body) = crate::api::call(
            &server,
            reqwest::Method::POST,
            "/v1/workflows",
            Some(
                json!({"name": "api", "event": CONTACT_CREATED, "provider": "hubspot",
                        "steps": serde_json::from_str::<Value>(&steps(options)).expect("steps")}),
            ),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{error}");
    }
    // An http workflow's step is `request`, with the connection's base URL and token.
    let (status, body) = crate::api::call(
        &server,
        reqwest::Method::POST,
        "/v1/workflows",
        Some(
            json!({"name": "api", "event": CONTACT_CREATED, "provider": "http",
                    "action": "http.request", "options": {"url": "https://x.example/"}}),
        ),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("an http workflow's step is action request")),
        "{body}"
    );
    server.stop().await;

    let file = std::env::temp_dir().join(format!("appevents-{}-bad-http.yaml", app.tag));
    std::fs::write(
        &file,
        "key: bad-http\nname: Bad\nevent: Contact Created\nprovider: salesforce\nsteps:\n  - name: notify\n    action: http.request\n    options:\n      url: https://hooks.example/x\n      headers: [x]\n",
    )
    .expect("write");
    let (code, _, err) = crate::cli::run(
        &app,
        &["workflow", "apply", "-f", file.to_str().expect("path")],
    )
    .await;
    std::fs::remove_file(&file).ok();
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "bad-http.yaml: step notify: action: option headers must be an object of strings"
        ),
        "{err}"
    );
    assert!(
        workflows::list(&app.pool, None, None)
            .await
            .expect("list")
            .is_empty()
    );
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

/// A HubSpot workflow file whose middle step is an HTTP request to `server`: the contact
/// created, then scored by the server (the request carries the contact's id and the step's
/// own key, never the CRM token), then tagged with the score's segment.
fn create_score_tag(server: &str) -> String {
    format!(
        r#"key: score-contacts
name: Contacts scored
event: Contact Created
provider: hubspot
steps:
  - name: create
    action: create-contact
    mapping:
      email: "{{{{payload.email}}}}"
      lastname: "{{{{payload.last_name}}}}"
  - name: score
    action: http.request
    options:
      url: {server}/scores
      headers:
        x-api-key: scoring-key
        x-contact: "{{{{steps.create.id}}}}"
    mapping:
      contact: "{{{{steps.create.id}}}}"
      email: "{{{{payload.email}}}}"
  - name: tag
    action: update-contact
    when: steps.score.score > 50
    options:
      id: "{{{{steps.create.id}}}}"
    mapping:
      segment: "{{{{steps.score.segment}}}}"
"#
    )
}

/// Applies a workflow file of `text` on the command line and switches it on for user "u"
/// on the stand-in; returns the workflow's id.
async fn applied(app: &TestApp, crm: &str, name: &str, text: &str) -> Uuid {
    app.app_event(CONTACT_CREATED).await;
    let file = std::env::temp_dir().join(format!("appevents-{}-{name}.yaml", app.tag));
    std::fs::write(&file, text).expect("write");
    crate::cli::ok(
        app,
        &["workflow", "apply", "-f", file.to_str().expect("path")],
    )
    .await;
    std::fs::remove_file(&file).ok();
    let workflow = workflows::list(&app.pool, None, None).await.expect("list")[0].id;
    let connection = app
        .connection("u", Provider::Hubspot, crm, "crm-token")
        .await;
    app.subscribe("u", workflow, connection).await;
    workflow
}

#[tokio::test]
async fn a_hubspot_workflow_s_http_step_is_read_by_the_next_step_and_never_carries_the_crm_token() {
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/scores"))
        .respond_with(
            wiremock::ResponseTemplate::new(200)
                .set_body_json(json!({"segment": "gold", "score": 87})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    applied(&app, &crm.url(), "score", &create_score_tag(&server.uri())).await;
    app.start_worker().await;

    app.publish(CONTACT_CREATED, "u", payload(), Some("evt-score"))
        .await;
    let runs = app
        .wait_for_runs("evt-score", 1, RunStatus::Succeeded)
        .await;

    let records = crm.standin.records();
    assert_eq!(records.len(), 1, "{records:#?}");
    let contact = &records[0];
    assert_eq!(contact.fields["segment"], json!("gold"), "{contact:#?}");
    assert_eq!((contact.creates, contact.updates), (1, 1));
    let received = server.received_requests().await.expect("recorded");
    assert_eq!(received.len(), 1);
    let scored = &received[0];
    let body: Value = serde_json::from_slice(&scored.body).expect("JSON body");
    assert_eq!(
        body,
        json!({"contact": contact.id, "email": "chain@example.com"})
    );
    let header = |name: &str| {
        scored
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("x-api-key").as_deref(), Some("scoring-key"));
    assert_eq!(header("x-contact").as_deref(), Some(contact.id.as_str()));
    assert_eq!(header("authorization"), None, "no CRM token: {scored:?}");
    assert!(
        !format!("{:?}", scored.headers).contains("crm-token"),
        "{scored:?}"
    );
    // The HubSpot account's calls are the create and the update: the HTTP request is not
    // counted toward its limit.
    let counted = r#"appevents_provider_calls_total{provider="hubspot"} 2"#;
    let seen = crate::support::eventually(Duration::from_secs(5), || async {
        app.metrics().await.contains(counted)
    })
    .await;
    assert!(seen, "{}", app.metrics().await);

    // `runs show` lists the HTTP step among the others, with its request and answer.
    let shown: Value = serde_json::from_str(
        &crate::cli::ok(&app, &["runs", "show", &runs[0].id.to_string()]).await,
    )
    .expect("JSON");
    let steps = shown["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(names, ["create", "score", "tag"], "{shown}");
    assert_eq!(steps[1]["status"], json!("succeeded"));
    assert_eq!(steps[1]["output"], json!({"segment": "gold", "score": 87}));
    assert_eq!(steps[1]["request"]["method"], json!("POST"));
    assert_eq!(
        steps[1]["request"]["url"],
        json!(format!("{}/scores", server.uri()))
    );
    assert!(!shown.to_string().contains("crm-token"), "{shown}");

    // Exported, the file says the same, and applying it again changes nothing.
    let exported = std::env::temp_dir().join(format!("appevents-{}-score-export", app.tag));
    let directory = exported.to_str().expect("path");
    crate::cli::ok(&app, &["workflow", "export", "-o", directory]).await;
    let text = std::fs::read_to_string(exported.join("score-contacts.yaml")).expect("exported");
    assert!(
        text.contains("action: http.request") && text.contains("x-api-key: scoring-key"),
        "{text}"
    );
    let again = crate::cli::ok(&app, &["workflow", "apply", "-f", directory]).await;
    assert!(again.starts_with("unchanged: score-contacts"), "{again}");
    std::fs::remove_dir_all(&exported).ok();
    server.verify().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_crm_workflow_s_http_step_is_held_to_the_outbound_rules() {
    let server = wiremock::MockServer::start().await;
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    // Nothing allowed: the HTTP step may not reach the loopback address; the CRM calls,
    // made with the CRM's own client, still go.
    let mut app = TestApp::with_settings(|s| s.http.allow = Vec::new()).await;
    applied(
        &app,
        &crm.url(),
        "refused",
        &create_score_tag(&server.uri()),
    )
    .await;
    app.start_worker().await;

    app.publish(CONTACT_CREATED, "u", payload(), Some("evt-refused"))
        .await;
    let runs = app.wait_for_runs("evt-refused", 1, RunStatus::Dead).await;

    let error = runs[0].last_error.as_ref().expect("error");
    assert_eq!(error["code"], json!("OUTBOUND_REFUSED"), "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("step score: outbound request to 127.0.0.1 refused")),
        "{error}"
    );
    assert!(
        server
            .received_requests()
            .await
            .expect("recorded")
            .is_empty()
    );
    assert_eq!(crm.standin.records().len(), 1, "step create ran");
    app.cleanup().await;
}

#[tokio::test]
async fn the_dry_run_sends_an_http_get_step_as_a_read_and_every_step_with_send() {
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("GET"))
        // The event's value is percent-encoded into the path.
        .and(wiremock::matchers::path("/segments/chain%40example.com"))
        .respond_with(
            wiremock::ResponseTemplate::new(200).set_body_json(json!({"segment": "gold"})),
        )
        .expect(2)
        .mount(&server)
        .await;
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::new().await;
    let text = format!(
        r#"key: segmented
name: Contacts segmented
event: Contact Created
provider: hubspot
steps:
  - name: segment
    action: http.request
    options: {{method: GET, url: "{}/segments/{{{{payload.email}}}}"}}
  - name: create
    action: create-contact
    mapping: {{email: "{{{{payload.email}}}}", segment: "{{{{steps.segment.segment}}}}"}}
"#,
        server.uri()
    );
    let id = applied(&app, &crm.url(), "segmented", &text)
        .await
        .to_string();
    let payload = payload().to_string();
    let test = |more: &'static str| {
        let mut args = vec!["workflow", "test", id.as_str(), "--user", "u"];
        args.extend(["--payload", payload.as_str(), "--json"]);
        args.extend(more.split_whitespace());
        args.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };
    let report = |args: Vec<String>| {
        let app = &app;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = crate::cli::ok(app, &args).await;
            serde_json::from_str::<Value>(&out).expect("JSON")
        }
    };
    let outcomes = |report: &Value| -> Vec<String> {
        report["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .filter_map(|s| s["outcome"].as_str().map(str::to_owned))
            .collect()
    };

    let rendered = report(test("")).await;
    assert_eq!(outcomes(&rendered), ["rendered", "rendered"], "{rendered}");
    assert_eq!(
        rendered["steps"][0]["request"]["headers"],
        json!([]),
        "no CRM token on the HTTP step: {rendered}"
    );
    assert!(
        server
            .received_requests()
            .await
            .expect("recorded")
            .is_empty()
    );

    let reads = report(test("--send-reads")).await;
    assert_eq!(outcomes(&reads), ["sent", "rendered"], "{reads}");
    assert_eq!(reads["steps"][0]["output"], json!({"segment": "gold"}));
    assert_eq!(
        reads["steps"][1]["request"]["body"]["properties"]["segment"],
        json!("gold"),
        "the write renders with the read's real answer: {reads}"
    );
    assert!(crm.standin.records().is_empty(), "the write was not sent");

    let sent = report(test("--send")).await;
    assert_eq!(outcomes(&sent), ["sent", "sent"], "{sent}");
    let records = crm.standin.records();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0].fields["segment"], json!("gold"));
    server.verify().await;
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
