//! The command line, as the README's newcomer and scripts use it.

use std::time::Duration;

use appevents_standin as standin;
use serde_json::Value;

use crate::support::{TestApp, appevents_command, eventually};

/// Runs the binary; returns (status code, stdout, stderr). Shared with other modules.
pub async fn run(app: &TestApp, args: &[&str]) -> (i32, String, String) {
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

pub async fn ok(app: &TestApp, args: &[&str]) -> String {
    let (code, out, err) = run(app, args).await;
    assert_eq!(code, 0, "appevents {args:?} failed: {err}");
    out
}

#[tokio::test]
async fn the_readme_story_from_the_command_line() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let url = crm.url();
    let mut app = TestApp::new().await;
    app.start_worker().await;

    ok(
        &app,
        &[
            "app-event",
            "create",
            "--name",
            "Contact Created",
            "--schema",
            r#"{"email":"ada@example.com","first_name":"Ada","last_name":"Lovelace"}"#,
        ],
    )
    .await;
    let sf = ok(&app, &["workflow", "create", "--name", "Contact to Salesforce", "--event", "Contact Created", "--provider", "salesforce", "--action", "create", "--sobject", "Contact",
        "--mapping", r#"{"Email":"{{payload.email}}","FirstName":"{{payload.first_name}}","LastName":"{{payload.last_name}}"}"#]).await;
    let hs = ok(&app, &["workflow", "create", "--name", "Contact to HubSpot", "--event", "Contact Created", "--provider", "hubspot", "--action", "create-contact",
        "--mapping", r#"{"email":"{{payload.email}}","firstname":"{{payload.first_name}}","lastname":"{{payload.last_name}}"}"#]).await;
    let sf_conn = ok(
        &app,
        &[
            "connection",
            "create",
            "--user",
            "user-123",
            "--provider",
            "salesforce",
            "--base-url",
            &url,
            "--access-token",
            "sf-secret-token",
        ],
    )
    .await;
    let hs_conn = ok(
        &app,
        &[
            "connection",
            "create",
            "--user",
            "user-123",
            "--provider",
            "hubspot",
            "--base-url",
            &url,
            "--access-token",
            "hs-secret-token",
        ],
    )
    .await;
    ok(
        &app,
        &[
            "subscription",
            "create",
            "--user",
            "user-123",
            "--workflow",
            &sf,
            "--connection",
            &sf_conn,
        ],
    )
    .await;
    ok(
        &app,
        &[
            "subscription",
            "create",
            "--user",
            "user-123",
            "--workflow",
            &hs,
            "--connection",
            &hs_conn,
        ],
    )
    .await;
    let id = ok(
        &app,
        &[
            "publish",
            "--name",
            "Contact Created",
            "--user",
            "user-123",
            "--payload",
            r#"{"email":"ada@example.com","first_name":"Ada","last_name":"Lovelace"}"#,
        ],
    )
    .await;
    assert!(!id.is_empty());

    let both = eventually(Duration::from_secs(20), || async {
        let out = ok(
            &app,
            &[
                "runs",
                "list",
                "--user",
                "user-123",
                "--status",
                "succeeded",
                "--json",
            ],
        )
        .await;
        serde_json::from_str::<Vec<Value>>(&out)
            .map(|runs| runs.len() == 2)
            .unwrap_or(false)
    })
    .await;
    assert!(both, "two succeeded runs listed");
    assert_eq!(crm.standin.records().len(), 2);

    let listed = ok(&app, &["connection", "list", "--user", "user-123"]).await;
    assert!(
        listed.contains("salesforce") && listed.contains("active"),
        "{listed}"
    );
    assert!(
        !listed.contains("secret-token"),
        "listings never show secrets: {listed}"
    );
    let as_json = ok(&app, &["connection", "list", "--json"]).await;
    assert!(!as_json.contains("secret-token"), "{as_json}");
    let workflows: Vec<Value> =
        serde_json::from_str(&ok(&app, &["workflow", "list", "--json"]).await).expect("json");
    assert_eq!(workflows.len(), 2);
    let filtered = ok(&app, &["runs", "list", "--workflow", &sf, "--json"]).await;
    let filtered: Vec<Value> = serde_json::from_str(&filtered).expect("json");
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0]["workflow"], "Contact to Salesforce");
    let none: Vec<Value> =
        serde_json::from_str(&ok(&app, &["runs", "list", "--status", "dead", "--json"]).await)
            .expect("json");
    assert!(none.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn bad_arguments_get_one_line_and_a_non_zero_exit() {
    let app = TestApp::new().await;
    let cases: &[&[&str]] = &[
        &["no-such-command"],
        &["publish", "--name", "X"],
        &["runs", "list", "--status", "exploded"],
        &[
            "connection",
            "create",
            "--user",
            "u",
            "--provider",
            "myspace",
            "--base-url",
            "http://x",
        ],
        &["workflow", "delete", "not-a-uuid"],
        &["runs", "list", "--since", "the day before yesterday"],
    ];
    for args in cases {
        let (code, out, err) = run(&app, args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "one line for {args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
        assert!(!err.contains("panicked"));
    }
    let failures: &[(&[&str], &str)] = &[
        (
            &["app-event", "create", "--name", "X", "--schema", "[1,2]"],
            "must be a JSON object",
        ),
        (
            &["app-event", "create", "--name", "X", "--schema", "{oops"],
            "--schema is not valid JSON",
        ),
        (
            &[
                "app-event",
                "create",
                "--name",
                "X",
                "--schema",
                "@/nonexistent/file.json",
            ],
            "cannot read",
        ),
        (
            &[
                "workflow",
                "create",
                "--name",
                "w",
                "--event",
                "Nope",
                "--provider",
                "hubspot",
                "--action",
                "create-contact",
                "--mapping",
                "{}",
            ],
            "no app event",
        ),
        (
            &["publish", "--name", "X", "--user", "u", "--payload", "[]"],
            "must be an object",
        ),
        (
            &[
                "workflow",
                "create",
                "--name",
                "w",
                "--event",
                "X",
                "--provider",
                "salesforce",
                "--action",
                "create",
                "--id-property",
                "email",
                "--mapping",
                "{}",
            ],
            "salesforce create does not take option id_property",
        ),
    ];
    for (args, expected) in failures {
        let (code, _, err) = run(&app, args).await;
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(
            err.matches(expected).count(),
            1,
            "the cause is said once: {err}"
        );
    }
    // A malformed node list stops every command at start, naming the node but not its text.
    for command in [&["worker"][..], &["serve"], &["runs", "list"]] {
        let output = appevents_command(&app.settings, command)
            .env(
                "AMQP_URL",
                "amqp://guest:hunter2@127.0.0.1:5672/%2f,,amqp://guest:hunter2@127.0.0.1:5673/%2f",
            )
            .output()
            .await
            .expect("run appevents");
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{command:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("amqp.url: node 2 of 3 is empty"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn connection_update_changes_only_what_is_given() {
    let app = TestApp::new().await;
    let id = ok(
        &app,
        &[
            "connection",
            "create",
            "--user",
            "user-patch",
            "--provider",
            "hubspot",
            "--base-url",
            "http://127.0.0.1:1",
            "--access-token",
            "kept-token",
        ],
    )
    .await;

    // The id names the connection: no --user or --provider, no token given.
    ok(
        &app,
        &[
            "connection",
            "update",
            &id,
            "--base-url",
            "http://127.0.0.1:2",
        ],
    )
    .await;

    let stored =
        appevents::catalog::connections::get(&app.pool, &app.keyring, id.parse().expect("uuid"))
            .await
            .expect("connection");
    use secrecy::ExposeSecret;
    assert_eq!(stored.base_url, "http://127.0.0.1:2");
    assert_eq!(
        stored.access_token.as_ref().map(|t| t.expose_secret()),
        Some("kept-token"),
        "the token not given stays"
    );
    let table = ok(&app, &["connection", "list", "--user", "user-patch"]).await;
    let header = table.lines().next().expect("header");
    assert!(header.contains("TOKEN"), "{table}");
    let row = table.lines().nth(1).expect("row");
    assert!(
        row.contains(" yes "),
        "the list shows the token is stored: {table}"
    );
    assert!(!table.contains("kept-token"), "{table}");

    let (code, _, err) = run(&app, &["connection", "update", &id]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing to update"), "{err}");
    app.cleanup().await;
}

#[tokio::test]
async fn workflow_names_are_unique_and_find_their_id() {
    let app = TestApp::new().await;
    app.app_event("Contact Created").await;
    let create = [
        "workflow",
        "create",
        "--name",
        "Contact to HubSpot",
        "--event",
        "Contact Created",
        "--provider",
        "hubspot",
        "--action",
        "create-contact",
        "--mapping",
        r#"{"email":"{{payload.email}}"}"#,
    ];
    let id = ok(&app, &create).await;

    let mut again = create;
    again[3] = "contact to hubspot";
    let (code, _, err) = run(&app, &again).await;
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("exists already"), "{err}");

    let found = ok(
        &app,
        &["workflow", "list", "--name", "Contact to HubSpot", "--ids"],
    )
    .await;
    assert_eq!(found, id);
    app.cleanup().await;
}

#[tokio::test]
async fn publishing_a_name_no_app_event_has_warns_but_publishes() {
    let app = TestApp::new().await;
    app.app_event("Contact Created").await;
    let publish = |name: &'static str| {
        let app = &app;
        async move {
            run(
                app,
                &["publish", "--name", name, "--user", "u", "--payload", "{}"],
            )
            .await
        }
    };

    let (code, out, err) = publish("Contact created").await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty(), "the id is printed");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("warning: no app event is named \"Contact created\""),
        "{err}"
    );

    let (code, _, err) = publish("Contact Created").await;
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "a known name publishes quietly: {err}");
    app.cleanup().await;
}
