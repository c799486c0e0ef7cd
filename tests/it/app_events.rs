//! App events as a product: aliases kept on rename, payload checks, the workflow dry run.
//! Through the real binary where an operator would use it, against the in-process worker.

use std::time::Duration;

use appevents::core::provider::Provider;
use appevents::pipeline::runs::RunStatus;
use appevents_standin::{self as standin, Faults, ScriptedAnswer};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::cli::{ok, run};
use crate::support::{CONTACT_CREATED, TestApp, eventually, record_emails};

const RENAMED: &str = "Contact Added";
const EXAMPLE: &str = r#"{"email":"ada@example.com","age":36}"#;
const SECRET: &str = "hs-secret-token-123";

/// `Contact Created` (example: email and age) with a HubSpot create-contact workflow that
/// user "u" has on against the stand-in, created through the binary. Returns the workflow
/// and connection ids.
async fn contact_workflow(app: &TestApp, crm: &str, payload_check: &str) -> (Uuid, Uuid) {
    ok(
        app,
        &[
            "app-event",
            "create",
            "--name",
            CONTACT_CREATED,
            "--schema",
            EXAMPLE,
            "--payload-check",
            payload_check,
        ],
    )
    .await;
    let workflow = app
        .workflow(
            "Contact to HubSpot",
            CONTACT_CREATED,
            Provider::Hubspot,
            "create-contact",
            json!({}),
            json!({"email": "{{payload.email}}", "age": "{{payload.age}}"}),
        )
        .await;
    let connection = app.connection("u", Provider::Hubspot, crm, SECRET).await;
    app.subscribe("u", workflow.id, connection).await;
    (workflow.id, connection)
}

/// Starts the worker and waits until it caches answers, so the tests below exercise the
/// cache's invalidation.
async fn start_caching_worker(app: &mut TestApp) {
    app.start_worker().await;
    let resolver = app.worker().context.resolver.clone();
    let caching = eventually(Duration::from_secs(10), || async { resolver.is_caching() }).await;
    assert!(caching, "the change listener is up");
}

/// Runs a catalog command through the binary and waits until the worker has been notified
/// of the change (its cache cleared), so the next event sees it.
async fn change_catalog(app: &TestApp, args: &[&str]) -> String {
    let resolver = app.worker().context.resolver.clone();
    let before = resolver.generation();
    let out = ok(app, args).await;
    let notified = eventually(Duration::from_secs(10), || async {
        resolver.generation() > before
    })
    .await;
    assert!(notified, "the change to {args:?} was notified");
    out
}

fn counter(app: &TestApp, family: &str, key: &'static str, value: &str) -> u64 {
    let metrics = &app.worker().context.metrics;
    let labels = vec![(key, value.to_owned())];
    match family {
        "payload_mismatches" => metrics.payload_mismatches.get_or_create(&labels).get(),
        "unmatched" => metrics.unmatched.get_or_create(&labels).get(),
        "dead_letters" => metrics.dead_letters.get_or_create(&labels).get(),
        "events" => metrics.events.get_or_create(&labels).get(),
        other => panic!("no metric family {other}"),
    }
}

async fn wait_for_counter(app: &TestApp, family: &str, key: &'static str, value: &str, n: u64) {
    let reached = eventually(Duration::from_secs(10), || async {
        counter(app, family, key, value) >= n
    })
    .await;
    assert!(
        reached,
        "{family}{{{key}={value}}} reached {n}: it is {}",
        counter(app, family, key, value)
    );
}

#[tokio::test]
async fn an_example_payload_must_be_a_json_object() {
    // Arrange
    let app = TestApp::new().await;
    ok(
        &app,
        &[
            "app-event",
            "create",
            "--name",
            CONTACT_CREATED,
            "--schema",
            EXAMPLE,
        ],
    )
    .await;

    // Act
    let created = run(
        &app,
        &["app-event", "create", "--name", "X", "--schema", "[1]"],
    )
    .await;
    let updated = run(
        &app,
        &["app-event", "update", CONTACT_CREATED, "--schema", "[1]"],
    )
    .await;

    // Assert
    for (code, out, err) in [created, updated] {
        assert_eq!(code, 1, "{err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(
            err,
            "error: the schema (example payload) must be a JSON object"
        );
    }
    let listed: Vec<Value> =
        serde_json::from_str(&ok(&app, &["app-event", "list", "--json"]).await).expect("json");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0]["schema"],
        json!({"email": "ada@example.com", "age": 36})
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_renamed_app_event_keeps_its_workflows_and_its_old_name_as_an_alias() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    let (workflow, _) = contact_workflow(&app, &crm.url(), "off").await;
    start_caching_worker(&mut app).await;
    // Resolved (and cached) under the old name before the rename.
    let before = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "before@example.com", "age": 1}),
            None,
        )
        .await;
    app.wait_for_runs(&before, 1, RunStatus::Succeeded).await;

    // Act
    change_catalog(
        &app,
        &["app-event", "update", CONTACT_CREATED, "--name", RENAMED],
    )
    .await;
    let old_name = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "old@example.com", "age": 2}),
            None,
        )
        .await;
    let new_name = app
        .publish(
            RENAMED,
            "u",
            json!({"email": "new@example.com", "age": 3}),
            None,
        )
        .await;

    // Assert
    let runs = app.wait_for_runs(&old_name, 1, RunStatus::Succeeded).await;
    assert_eq!(runs[0].workflow_id, workflow);
    app.wait_for_runs(&new_name, 1, RunStatus::Succeeded).await;
    let workflows: Vec<Value> =
        serde_json::from_str(&ok(&app, &["workflow", "list", "--json"]).await).expect("json");
    assert_eq!(
        workflows[0]["event"], RENAMED,
        "the workflow stays attached"
    );
    let listed: Vec<Value> =
        serde_json::from_str(&ok(&app, &["app-event", "list", "--json"]).await).expect("json");
    assert_eq!(listed[0]["name"], RENAMED);
    assert_eq!(listed[0]["aliases"], json!([CONTACT_CREATED]));
    let table = ok(&app, &["app-event", "list"]).await;
    assert!(
        table.lines().next().unwrap_or("").contains("ALIASES"),
        "{table}"
    );
    assert!(table.contains(CONTACT_CREATED), "{table}");
    let emails = record_emails(&crm);
    assert_eq!(
        emails,
        ["before@example.com", "old@example.com", "new@example.com"]
    );
    app.cleanup().await;
}

#[tokio::test]
async fn removing_an_alias_leaves_events_under_it_unmatched() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    contact_workflow(&app, &crm.url(), "off").await;
    start_caching_worker(&mut app).await;
    change_catalog(
        &app,
        &["app-event", "update", CONTACT_CREATED, "--name", RENAMED],
    )
    .await;
    // The alias resolves, and its answer is cached.
    let aliased = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "a@example.com", "age": 1}),
            None,
        )
        .await;
    app.wait_for_runs(&aliased, 1, RunStatus::Succeeded).await;

    // Act
    change_catalog(
        &app,
        &[
            "app-event",
            "update",
            RENAMED,
            "--remove-alias",
            CONTACT_CREATED,
        ],
    )
    .await;
    let after = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "b@example.com", "age": 2}),
            None,
        )
        .await;

    // Assert
    wait_for_counter(&app, "unmatched", "reason", "unknown_event", 1).await;
    assert!(app.runs(&after).await.is_empty());
    assert_eq!(crm.standin.records().len(), 1);
    let listed: Vec<Value> =
        serde_json::from_str(&ok(&app, &["app-event", "list", "--json"]).await).expect("json");
    assert_eq!(listed[0]["aliases"], json!([]));
    let renamed = app
        .publish(
            RENAMED,
            "u",
            json!({"email": "c@example.com", "age": 3}),
            None,
        )
        .await;
    app.wait_for_runs(&renamed, 1, RunStatus::Succeeded).await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_name_or_alias_belongs_to_one_app_event() {
    // Arrange
    let app = TestApp::new().await;
    ok(
        &app,
        &[
            "app-event",
            "create",
            "--name",
            CONTACT_CREATED,
            "--schema",
            EXAMPLE,
        ],
    )
    .await;
    ok(
        &app,
        &["app-event", "update", CONTACT_CREATED, "--name", RENAMED],
    )
    .await;
    ok(
        &app,
        &[
            "app-event",
            "create",
            "--name",
            "Deal Won",
            "--schema",
            "{}",
        ],
    )
    .await;

    // Act
    let create = run(
        &app,
        &[
            "app-event",
            "create",
            "--name",
            CONTACT_CREATED,
            "--schema",
            "{}",
        ],
    )
    .await;
    let rename = run(
        &app,
        &["app-event", "update", "Deal Won", "--name", CONTACT_CREATED],
    )
    .await;
    let current = run(
        &app,
        &["app-event", "create", "--name", RENAMED, "--schema", "{}"],
    )
    .await;

    // Assert
    for (code, _, err) in [&create, &rename] {
        assert_eq!(*code, 1, "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(r#""Contact Created" is an alias of app event "Contact Added""#),
            "{err}"
        );
        assert!(
            err.contains(r#"--remove-alias "Contact Created""#),
            "says how to free it: {err}"
        );
    }
    assert_eq!(current.0, 1);
    assert!(current.2.contains("already exists"), "{}", current.2);
    let (code, _, err) = run(
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
            "--action",
            "create-contact",
            "--mapping",
            "{}",
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains(r#"it is an alias of "Contact Added""#),
        "managing takes the current name, and says whose alias it is: {err}"
    );
    // An app event may take back its own alias; renaming with --remove-alias keeps none.
    ok(
        &app,
        &["app-event", "update", "Deal Won", "--name", "Deal Closed"],
    )
    .await;
    ok(
        &app,
        &["app-event", "update", "Deal Closed", "--name", "Deal Won"],
    )
    .await;
    ok(
        &app,
        &[
            "app-event",
            "update",
            "Deal Won",
            "--name",
            "Deal Lost",
            "--remove-alias",
            "Deal Won",
        ],
    )
    .await;
    let listed: Vec<Value> =
        serde_json::from_str(&ok(&app, &["app-event", "list", "--json"]).await).expect("json");
    let deal = listed
        .iter()
        .find(|e| e["name"] == "Deal Lost")
        .expect("Deal Lost listed");
    assert_eq!(deal["aliases"], json!(["Deal Closed"]));
    // Once the alias is removed, the name is free.
    ok(
        &app,
        &[
            "app-event",
            "update",
            RENAMED,
            "--remove-alias",
            CONTACT_CREATED,
        ],
    )
    .await;
    ok(
        &app,
        &[
            "app-event",
            "create",
            "--name",
            CONTACT_CREATED,
            "--schema",
            "{}",
        ],
    )
    .await;
    app.cleanup().await;
}

/// The app event with the given payload check, the worker running, a mismatching event
/// (`age` as text) published. Returns the app and the event's id.
async fn publish_mismatching(crm: &str, payload_check: &str) -> (TestApp, String) {
    let mut app = TestApp::new().await;
    contact_workflow(&app, crm, payload_check).await;
    app.start_worker().await;
    let id = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "typed@example.com", "age": "36"}),
            None,
        )
        .await;
    (app, id)
}

/// A payload like the example runs whatever the mode.
async fn assert_a_matching_event_runs(app: &TestApp) {
    let id = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "matching@example.com", "age": 40, "plan": "pro"}),
            None,
        )
        .await;
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
}

#[tokio::test]
async fn with_the_check_off_a_mismatching_event_runs_and_is_not_counted() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");

    // Act
    let (app, id) = publish_mismatching(&crm.url(), "off").await;

    // Assert
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    assert_eq!(
        counter(&app, "payload_mismatches", "event", CONTACT_CREATED),
        0
    );
    assert_a_matching_event_runs(&app).await;
    assert!(app.take_dead_letters().await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn with_the_check_on_warn_a_mismatching_event_runs_and_is_counted() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");

    // Act
    let (app, id) = publish_mismatching(&crm.url(), "warn").await;

    // Assert
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    assert_eq!(
        counter(&app, "payload_mismatches", "event", CONTACT_CREATED),
        1
    );
    assert_a_matching_event_runs(&app).await;
    assert_eq!(
        counter(&app, "payload_mismatches", "event", CONTACT_CREATED),
        1,
        "a matching event is not counted"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"appevents_payload_mismatches_total{event="Contact Created"} 1"#),
        "{metrics}"
    );
    assert!(app.take_dead_letters().await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn with_the_check_on_reject_a_mismatching_event_is_dead_lettered_and_runs_nothing() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    contact_workflow(&app, &crm.url(), "reject").await;
    app.start_worker().await;

    // Act
    let id = app
        .publish(CONTACT_CREATED, "u", json!({"age": "36"}), None)
        .await;
    // Unmatched events are not checked: user "v" has no workflow on.
    app.publish(CONTACT_CREATED, "v", json!({"age": "36"}), None)
        .await;

    // Assert
    let letters = app.dead_letters_until(1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        letter.header("x-appevents-reason").as_deref(),
        Some(
            "payload does not match the example of Contact Created: missing field email; field age is a string, expected a number"
        )
    );
    assert_eq!(
        letter.header("x-appevents-reason-code").as_deref(),
        Some("payload_mismatch")
    );
    assert_eq!(letter.header("x-appevents-event-id"), Some(id.clone()));
    assert_eq!(
        letter.header("x-appevents-workflow-id"),
        None,
        "the whole event"
    );
    wait_for_counter(&app, "unmatched", "reason", "no_subscription", 1).await;
    assert!(app.runs(&id).await.is_empty(), "no run claimed");
    assert!(crm.standin.requests().is_empty(), "no call made");
    // Counted as the event is settled, just after its letter is confirmed.
    wait_for_counter(&app, "dead_letters", "reason", "payload_mismatch", 1).await;
    wait_for_counter(&app, "events", "outcome", "payload_mismatch", 1).await;
    assert_eq!(
        counter(&app, "payload_mismatches", "event", CONTACT_CREATED),
        1
    );
    assert_a_matching_event_runs(&app).await;
    assert!(
        app.take_dead_letters().await.is_empty(),
        "nothing else dead-lettered"
    );
    let listed = ok(&app, &["app-event", "list"]).await;
    assert!(listed.contains("reject"), "{listed}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_rejected_event_replayed_once_the_check_allows_it_runs() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    contact_workflow(&app, &crm.url(), "reject").await;
    start_caching_worker(&mut app).await;
    let id = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "late@example.com", "age": "36"}),
            None,
        )
        .await;
    wait_for_counter(&app, "dead_letters", "reason", "payload_mismatch", 1).await;
    change_catalog(
        &app,
        &[
            "app-event",
            "update",
            CONTACT_CREATED,
            "--payload-check",
            "warn",
        ],
    )
    .await;

    // Act
    let replayed = ok(
        &app,
        &["dlq", "replay", "--reason", "payload does not match"],
    )
    .await;

    // Assert
    assert!(replayed.contains("replayed 1 dead letter(s)"), "{replayed}");
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    assert_eq!(
        counter(&app, "payload_mismatches", "event", CONTACT_CREATED),
        2,
        "rejected once, then let through and counted under warn"
    );
    assert!(app.take_dead_letters().await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn the_dry_run_prints_the_mapped_request_with_the_secret_masked_and_sends_nothing() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::new().await;
    let (workflow, _) = contact_workflow(&app, &crm.url(), "off").await;
    let workflow = workflow.to_string();

    // Act
    let text = ok(&app, &["workflow", "test", &workflow, "--user", "u"]).await;
    let as_json = ok(
        &app,
        &["workflow", "test", &workflow, "--user", "u", "--json"],
    )
    .await;
    let placeholder = ok(&app, &["workflow", "test", &workflow]).await;
    let unsubscribed = ok(&app, &["workflow", "test", &workflow, "--user", "nobody"]).await;

    // Assert
    let url = format!("{}/crm/v3/objects/contacts", crm.url());
    assert!(text.contains(&format!("POST {url}")), "{text}");
    assert!(text.contains("authorization: Bearer hs-s****"), "{text}");
    assert!(text.contains(r#""email": "ada@example.com""#), "{text}");
    assert!(text.contains("u's subscription"), "{text}");
    assert!(text.contains("nothing was sent"), "{text}");
    let report: Value = serde_json::from_str(&as_json).expect("json");
    assert_eq!(report["request"]["method"], "POST");
    assert_eq!(report["request"]["url"], url);
    assert_eq!(
        report["request"]["headers"],
        json!([{"name": "authorization", "value": "Bearer hs-s****"}])
    );
    assert_eq!(
        report["request"]["body"],
        json!({"properties": {"email": "ada@example.com", "age": 36}})
    );
    assert_eq!(report["connection"]["source"], "subscription");
    assert_eq!(report["sent"], false);
    assert!(
        placeholder.contains("POST https://{connection base URL}/crm/v3/objects/contacts"),
        "{placeholder}"
    );
    assert!(placeholder.contains("a placeholder"), "{placeholder}");
    assert!(!placeholder.contains("authorization"), "{placeholder}");
    assert!(
        unsubscribed.contains("a placeholder (user nobody has not switched this workflow on)"),
        "{unsubscribed}"
    );
    for output in [&text, &as_json, &placeholder, &unsubscribed] {
        assert!(!output.contains(SECRET), "the secret never shows: {output}");
    }
    assert!(crm.standin.requests().is_empty(), "the CRM saw no call");
    assert!(app.all_runs().await.is_empty(), "no run recorded");
    app.cleanup().await;
}

#[tokio::test]
async fn the_dry_run_shows_a_given_payload_and_how_it_differs_from_the_example() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::new().await;
    let (workflow, connection) = contact_workflow(&app, &crm.url(), "reject").await;

    // Act
    let out = ok(
        &app,
        &[
            "workflow",
            "test",
            &workflow.to_string(),
            "--connection",
            &connection.to_string(),
            "--payload",
            r#"{"age":"36"}"#,
        ],
    )
    .await;

    // Assert
    assert!(out.contains("(given, of user u)"), "{out}");
    assert!(
        out.contains("payload does not match the example of Contact Created: missing field email; field age is a string, expected a number (the check is reject: the worker dead-letters it and runs nothing)"),
        "{out}"
    );
    assert!(out.contains(r#""age": "36""#), "{out}");
    assert!(crm.standin.requests().is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn the_dry_run_with_send_makes_the_call_and_prints_the_response() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::new().await;
    let (workflow, _) = contact_workflow(&app, &crm.url(), "off").await;
    let workflow = workflow.to_string();

    // Act
    let without_connection = run(&app, &["workflow", "test", &workflow, "--send"]).await;
    let sent = ok(
        &app,
        &["workflow", "test", &workflow, "--user", "u", "--send"],
    )
    .await;

    // Assert
    assert_eq!(without_connection.0, 1);
    assert!(
        without_connection
            .2
            .contains("--send needs a real connection"),
        "{}",
        without_connection.2
    );
    let requests = crm.standin.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/crm/v3/objects/contacts");
    let records = crm.standin.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].fields["email"], "ada@example.com");
    assert!(
        sent.contains(&format!("sent: status 201, provider id {}", records[0].id)),
        "{sent}"
    );
    assert!(!sent.contains(SECRET), "{sent}");
    assert!(app.all_runs().await.is_empty(), "a test is not a run");

    // A failure is classified as in a run, and the command fails.
    crm.standin.set_faults(Faults {
        script: vec![ScriptedAnswer {
            status: 400,
            ..ScriptedAnswer::default()
        }],
        ..Faults::default()
    });
    let (code, out, err) = run(
        &app,
        &["workflow", "test", &workflow, "--user", "u", "--send"],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(out.contains("sent: failed: permanent 400"), "{out}");
    assert!(
        err.starts_with("error: the step failed: permanent 400"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    app.cleanup().await;
}

#[tokio::test]
async fn the_dry_run_of_a_missing_workflow_or_a_wrong_connection_fails_in_one_line() {
    // Arrange
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let app = TestApp::new().await;
    let (workflow, _) = contact_workflow(&app, &crm.url(), "off").await;
    let missing = Uuid::now_v7().to_string();

    // Act
    let no_workflow = run(&app, &["workflow", "test", &missing]).await;
    let no_connection = run(
        &app,
        &[
            "workflow",
            "test",
            &workflow.to_string(),
            "--connection",
            &missing,
        ],
    )
    .await;
    let salesforce = app
        .connection("u", Provider::Salesforce, &crm.url(), "sf-token")
        .await;
    let other_provider = run(
        &app,
        &[
            "workflow",
            "test",
            &workflow.to_string(),
            "--connection",
            &salesforce.to_string(),
        ],
    )
    .await;

    // Assert
    for ((code, out, err), expected) in [
        (no_workflow, format!("error: no workflow {missing}")),
        (no_connection, format!("error: no connection {missing}")),
    ] {
        assert_eq!(code, 1, "{err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err, expected);
    }
    assert_eq!(other_provider.0, 1);
    assert!(
        other_provider.2.contains(&format!(
            "connection {salesforce} is a salesforce connection"
        )),
        "{}",
        other_provider.2
    );
    app.cleanup().await;
}
