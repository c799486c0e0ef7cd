//! Workflows as files: `workflow apply` and `workflow export` on the command line, and the
//! API's equivalent, against the real Postgres. The files are the ones in examples/workflows/.

use std::path::{Path, PathBuf};

use appevents::catalog::workflows;
use reqwest::Method;
use serde_json::{Value, json};

use crate::api::call;
use crate::cli::{ok, run};
use crate::support::{CONTACT_CREATED, ServerHandle, TestApp};

const EXAMPLES: [&str; 2] = [
    "salesforce-find-or-create.yaml",
    "hubspot-find-or-create.json",
];

/// A fresh directory of this test's own, with copies of the example files.
fn directory_of_examples(app: &TestApp, name: &str) -> PathBuf {
    let directory = std::env::temp_dir().join(format!("appevents-{}-{name}", app.tag));
    std::fs::create_dir_all(&directory).expect("temp dir");
    for file in EXAMPLES {
        let source = format!("{}/examples/workflows/{file}", env!("CARGO_MANIFEST_DIR"));
        std::fs::copy(source, directory.join(file)).expect("copy example");
    }
    directory
}

fn path(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// (key, name, id, updated_at) of every workflow, by key.
async fn catalog(app: &TestApp) -> Vec<(Option<String>, String, String, String)> {
    let mut all: Vec<_> = workflows::list(&app.pool, None, None)
        .await
        .expect("list")
        .into_iter()
        .map(|w| (w.key, w.name, w.id.to_string(), w.updated_at.to_string()))
        .collect();
    all.sort();
    all
}

#[tokio::test]
async fn apply_creates_then_changes_nothing_then_updates_only_what_a_file_changes() {
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let directory = directory_of_examples(&app, "apply");
    let dir = path(&directory);

    let planned = ok(&app, &["workflow", "apply", "-f", dir, "--dry-run"]).await;
    assert!(
        planned
            .contains("created: contact-to-salesforce (Contact to Salesforce, found or created)")
            && planned.contains("created: contact-to-hubspot")
            && planned.contains("dry run: nothing was changed"),
        "{planned}"
    );
    assert!(catalog(&app).await.is_empty(), "a dry run creates nothing");

    let created = ok(&app, &["workflow", "apply", "-f", dir]).await;
    assert_eq!(created.matches("created: ").count(), 2, "{created}");
    let first = catalog(&app).await;
    let keys: Vec<_> = first.iter().map(|w| w.0.clone()).collect();
    assert_eq!(
        keys,
        [
            Some("contact-to-hubspot".to_owned()),
            Some("contact-to-salesforce".to_owned())
        ]
    );

    let again = ok(&app, &["workflow", "apply", "-f", dir]).await;
    assert_eq!(again.matches("unchanged: ").count(), 2, "{again}");
    assert_eq!(catalog(&app).await, first, "applying again touches nothing");

    // The file changes: a new name and a step's mapping.
    let file = directory.join("salesforce-find-or-create.yaml");
    let text = std::fs::read_to_string(&file).expect("read");
    let changed = text
        .replace(
            "name: Contact to Salesforce, found or created",
            "name: Contacts into Salesforce",
        )
        .replace("LeadSource: appevents", "LeadSource: web");
    assert_ne!(changed, text);
    std::fs::write(&file, changed).expect("write");

    let planned = ok(&app, &["workflow", "apply", "-f", dir, "--dry-run"]).await;
    assert!(
        planned.contains("updated (name, steps): contact-to-salesforce (Contacts into Salesforce)")
            && planned.contains("unchanged: contact-to-hubspot"),
        "{planned}"
    );
    assert_eq!(catalog(&app).await, first, "a dry run changes nothing");

    let file_alone = path(&file);
    let updated = ok(&app, &["workflow", "apply", "-f", file_alone]).await;
    assert!(
        updated.starts_with("updated (name, steps): contact-to-salesforce"),
        "{updated}"
    );
    let after = catalog(&app).await;
    let salesforce = after
        .iter()
        .find(|w| w.0.as_deref() == Some("contact-to-salesforce"))
        .expect("still there");
    let before = first
        .iter()
        .find(|w| w.0.as_deref() == Some("contact-to-salesforce"))
        .expect("was there");
    assert_eq!(salesforce.1, "Contacts into Salesforce");
    assert_eq!(
        salesforce.2, before.2,
        "the same workflow, updated in place"
    );
    let stored = workflows::list(&app.pool, None, Some("Contacts into Salesforce"))
        .await
        .expect("list");
    assert_eq!(stored[0].steps[1].mapping["LeadSource"], json!("web"));

    std::fs::remove_dir_all(&directory).ok();
    app.cleanup().await;
}

#[tokio::test]
async fn a_bad_file_is_named_with_its_step_and_field_and_its_directory_applies_nothing() {
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let directory = directory_of_examples(&app, "bad");
    let hubspot =
        std::fs::read_to_string(directory.join("hubspot-find-or-create.json")).expect("read");
    // A later step read before it runs, in a file otherwise like the example.
    let bad = hubspot
        .replace("contact-to-hubspot", "bad-hubspot")
        .replace("with its company", "badly")
        .replace(
            "\"when\": \"steps.find.total == 0\"",
            "\"when\": \"steps.update.id == ''\"",
        );
    assert_ne!(bad, hubspot);
    std::fs::write(directory.join("z-bad.json"), bad).expect("write");

    let (code, out, err) = run(&app, &["workflow", "apply", "-f", path(&directory)]).await;
    assert_ne!(code, 0, "{out}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("z-bad.json: step create: when: ") && err.contains("reads step update"),
        "the file, the step and the field: {err}"
    );
    assert!(catalog(&app).await.is_empty(), "nothing applied: {out}");

    // A field the format does not have, in YAML.
    let yaml = directory.join("typo.yaml");
    let text = std::fs::read_to_string(directory.join("salesforce-find-or-create.yaml"))
        .expect("read")
        .replace("    mapping:\n      Email", "    mappings:\n      Email");
    std::fs::write(&yaml, text).expect("write");
    let (code, _, err) = run(&app, &["workflow", "apply", "-f", path(&yaml)]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("typo.yaml: step create: unknown field `mappings`"),
        "{err}"
    );

    // An app event the catalog does not have.
    let missing = directory.join("missing.yaml");
    let text = std::fs::read_to_string(directory.join("salesforce-find-or-create.yaml"))
        .expect("read")
        .replace("event: Contact Created", "event: Contact Deleted");
    std::fs::write(&missing, text).expect("write");
    let (code, _, err) = run(&app, &["workflow", "apply", "-f", path(&missing)]).await;
    assert_ne!(code, 0);
    assert!(err.contains("missing.yaml: event: "), "{err}");
    assert!(catalog(&app).await.is_empty());

    std::fs::remove_dir_all(&directory).ok();
    app.cleanup().await;
}

#[tokio::test]
async fn export_then_apply_changes_nothing() {
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let directory = directory_of_examples(&app, "export");
    ok(&app, &["workflow", "apply", "-f", path(&directory)]).await;
    // A workflow made on the command line has no key: export leaves it out, until a file of
    // its name takes it over.
    ok(
        &app,
        &[
            "workflow",
            "create",
            "--name",
            "By hand",
            "--event",
            CONTACT_CREATED,
            "--provider",
            "hubspot",
            "--action",
            "create-contact",
            "--mapping",
            r#"{"email":"{{payload.email}}"}"#,
        ],
    )
    .await;
    let before = catalog(&app).await;

    for (format, extension) in [(None, "yaml"), (Some("--json"), "json")] {
        let exported = directory.join(format!("exported-{extension}"));
        let mut args = vec!["workflow", "export", "-o", path(&exported)];
        args.extend(format);
        let written = ok(&app, &args).await;
        assert_eq!(written.lines().count(), 2, "{written}");
        assert!(
            exported
                .join(format!("contact-to-salesforce.{extension}"))
                .is_file()
        );
        assert!(
            exported
                .join(format!("contact-to-hubspot.{extension}"))
                .is_file()
        );

        let applied = ok(&app, &["workflow", "apply", "-f", path(&exported)]).await;
        assert_eq!(applied.matches("unchanged: ").count(), 2, "{applied}");
        assert_eq!(catalog(&app).await, before, "export then apply is a no-op");
    }

    let one = directory.join("one");
    ok(
        &app,
        &[
            "workflow",
            "export",
            "--key",
            "contact-to-hubspot",
            "-o",
            path(&one),
        ],
    )
    .await;
    let exported = std::fs::read_dir(&one).expect("dir").count();
    assert_eq!(exported, 1);
    let (code, _, err) = run(
        &app,
        &["workflow", "export", "--key", "nope", "-o", path(&one)],
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("no workflow of key \"nope\""), "{err}");

    // The hand-made workflow, written as a file: taken over, its key set.
    let by_hand = directory.join("by-hand.yaml");
    std::fs::write(&by_hand, "key: by-hand\nname: By hand\nevent: Contact Created\nprovider: hubspot\nsteps:\n  - name: main\n    action: create-contact\n    mapping:\n      email: \"{{payload.email}}\"\n").expect("write");
    let taken = ok(&app, &["workflow", "apply", "-f", path(&by_hand)]).await;
    assert!(
        taken.starts_with("updated (key): by-hand (By hand)"),
        "{taken}"
    );
    let again = ok(&app, &["workflow", "apply", "-f", path(&by_hand)]).await;
    assert!(again.starts_with("unchanged: by-hand"), "{again}");
    assert_eq!(catalog(&app).await.len(), 3);

    std::fs::remove_dir_all(&directory).ok();
    app.cleanup().await;
}

#[tokio::test]
async fn the_api_applies_and_exports_the_same_documents() {
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let server = ServerHandle::start(&app.settings).await;
    let documents: Vec<Value> = EXAMPLES
        .iter()
        .map(|file| crate::steps::example_file(file))
        .collect();

    let (status, body) = call(
        &server,
        Method::POST,
        "/v1/workflows/apply?dry_run=true",
        Some(json!(documents)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dry_run"], json!(true));
    assert_eq!(body["workflows"][0]["change"], "created", "{body}");
    assert!(catalog(&app).await.is_empty(), "a dry run creates nothing");

    let (status, body) = call(
        &server,
        Method::POST,
        "/v1/workflows/apply",
        Some(json!(documents)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["workflows"][1]["change"], "created", "{body}");
    let first = catalog(&app).await;
    assert_eq!(first.len(), 2);

    let (status, exported) = call(&server, Method::GET, "/v1/workflows/export", None).await;
    assert_eq!(status, 200, "{exported}");
    assert_eq!(exported.as_array().map(Vec::len), Some(2), "{exported}");
    let (status, body) = call(&server, Method::POST, "/v1/workflows/apply", Some(exported)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["workflows"]
            .as_array()
            .expect("outcomes")
            .iter()
            .all(|o| o["change"] == "unchanged"),
        "{body}"
    );
    assert_eq!(catalog(&app).await, first, "export then apply is a no-op");

    // One document, changed: the fields that change.
    let mut changed = documents[1].clone();
    changed["when"] = json!("payload.email != \"\"");
    let (status, body) = call(
        &server,
        Method::POST,
        "/v1/workflows/apply?dry_run=true",
        Some(changed.clone()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["workflows"][0]["change"], "updated");
    assert_eq!(body["workflows"][0]["fields"], json!(["when"]));
    assert_eq!(catalog(&app).await, first);

    // A bad document among good ones: 400 naming it, its step and its field; nothing applied.
    let mut bad = documents[0].clone();
    bad["key"] = json!("another");
    bad["name"] = json!("Another");
    bad["steps"][1]["on_error"] = json!("retry");
    let (status, body) = call(
        &server,
        Method::POST,
        "/v1/workflows/apply",
        Some(json!([changed, bad])),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(
        error.starts_with("document 2: step create: on_error: unknown variant `retry`"),
        "{error}"
    );
    assert_eq!(catalog(&app).await, first, "nothing applied");

    let (status, body) = call(
        &server,
        Method::GET,
        "/v1/workflows/export?key=contact-to-hubspot",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body[0]["key"], "contact-to-hubspot", "{body}");
    let (status, _) = call(&server, Method::GET, "/v1/workflows/export?key=nope", None).await;
    assert_eq!(status, 404);

    server.stop().await;
    app.cleanup().await;
}
