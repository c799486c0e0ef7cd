//! The worker end to end: events become records in the stand-in CRMs.

use std::time::Duration;

use appevents::core::provider::Provider;
use appevents::pipeline::runs::RunStatus;
use appevents_standin as standin;
use lapin::BasicProperties;
use serde_json::{Value, json};

use crate::support::{TestApp, eventually};

const EVENT: &str = "Contact Created";

fn salesforce_mapping() -> Value {
    json!({"Email": "{{payload.email}}", "FirstName": "{{payload.first_name}}", "LastName": "{{payload.last_name}}", "LeadSource": "appevents"})
}

fn hubspot_mapping() -> Value {
    json!({"email": "{{payload.email}}", "firstname": "{{payload.first_name}}", "lastname": "{{payload.last_name}}"})
}

/// An app event with a Salesforce and a HubSpot workflow, both on for `user` against `crm`.
async fn two_workflows(app: &TestApp, user: &str, crm: &str) -> (uuid::Uuid, uuid::Uuid) {
    app.app_event(EVENT).await;
    let sf = app
        .workflow(
            "to salesforce",
            EVENT,
            Provider::Salesforce,
            "create",
            json!({}),
            salesforce_mapping(),
        )
        .await;
    let hs = app
        .workflow(
            "to hubspot",
            EVENT,
            Provider::Hubspot,
            "create-contact",
            json!({}),
            hubspot_mapping(),
        )
        .await;
    let sf_conn = app
        .connection(user, Provider::Salesforce, crm, "sf-token")
        .await;
    let hs_conn = app
        .connection(user, Provider::Hubspot, crm, "hs-token")
        .await;
    app.subscribe(user, sf.id, sf_conn).await;
    app.subscribe(user, hs.id, hs_conn).await;
    (sf.id, hs.id)
}

#[tokio::test]
async fn an_event_becomes_a_contact_in_each_crm_with_the_mapped_fields() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    two_workflows(&app, "user-1", &crm.url()).await;
    app.start_worker().await;

    let id = app
        .publish(
            EVENT,
            "user-1",
            json!({"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}),
            None,
        )
        .await;

    let runs = app.wait_for_runs(&id, 2, RunStatus::Succeeded).await;
    let records = crm.standin.records();
    assert_eq!(records.len(), 2, "{records:#?}");
    let sf = records
        .iter()
        .find(|r| r.provider == "salesforce")
        .expect("salesforce contact");
    assert_eq!(sf.object, "Contact");
    assert_eq!(
        Value::Object(sf.fields.clone()),
        json!({"Email": "ada@example.com", "FirstName": "Ada", "LastName": "Lovelace", "LeadSource": "appevents"})
    );
    let hs = records
        .iter()
        .find(|r| r.provider == "hubspot")
        .expect("hubspot contact");
    assert_eq!(
        Value::Object(hs.fields.clone()),
        json!({"email": "ada@example.com", "firstname": "Ada", "lastname": "Lovelace"})
    );
    let provider_ids: Vec<Option<String>> = runs.iter().map(|r| r.provider_id.clone()).collect();
    assert!(provider_ids.contains(&Some(sf.id.clone())), "{runs:#?}");
    assert!(provider_ids.contains(&Some(hs.id.clone())), "{runs:#?}");
    assert!(runs.iter().all(|r| r.attempts == 1));
    app.cleanup().await;
}

#[tokio::test]
async fn upserts_create_then_update_the_same_record() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.app_event(EVENT).await;
    let sf = app
        .workflow(
            "sf upsert",
            EVENT,
            Provider::Salesforce,
            "upsert",
            json!({"external_id_field": "External_Id__c"}),
            json!({"External_Id__c": "{{payload.id}}", "LastName": "{{payload.last_name}}"}),
        )
        .await;
    let hs = app
        .workflow(
            "hs upsert",
            EVENT,
            Provider::Hubspot,
            "upsert-contact",
            json!({}),
            hubspot_mapping(),
        )
        .await;
    let sf_conn = app
        .connection("u", Provider::Salesforce, &crm.url(), "t")
        .await;
    let hs_conn = app
        .connection("u", Provider::Hubspot, &crm.url(), "t")
        .await;
    app.subscribe("u", sf.id, sf_conn).await;
    app.subscribe("u", hs.id, hs_conn).await;
    app.start_worker().await;

    let first = app
        .publish(
            EVENT,
            "u",
            json!({"id": "c-1", "email": "a@b.c", "first_name": "A", "last_name": "One"}),
            None,
        )
        .await;
    app.wait_for_runs(&first, 2, RunStatus::Succeeded).await;
    let second = app
        .publish(
            EVENT,
            "u",
            json!({"id": "c-1", "email": "a@b.c", "first_name": "A", "last_name": "Two"}),
            None,
        )
        .await;
    app.wait_for_runs(&second, 2, RunStatus::Succeeded).await;

    let records = crm.standin.records();
    assert_eq!(records.len(), 2, "one record per CRM: {records:#?}");
    for record in &records {
        assert_eq!((record.creates, record.updates), (1, 1), "{record:#?}");
    }
    let sf_record = records
        .iter()
        .find(|r| r.provider == "salesforce")
        .expect("sf");
    assert_eq!(sf_record.fields["LastName"], "Two");
    assert_eq!(sf_record.fields["External_Id__c"], "c-1");
    app.cleanup().await;
}

#[tokio::test]
async fn a_hubspot_conflict_becomes_an_update_of_the_existing_contact() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.app_event(EVENT).await;
    let hs = app
        .workflow(
            "hs",
            EVENT,
            Provider::Hubspot,
            "create-contact",
            json!({}),
            hubspot_mapping(),
        )
        .await;
    let conn = app
        .connection("u", Provider::Hubspot, &crm.url(), "t")
        .await;
    app.subscribe("u", hs.id, conn).await;
    app.start_worker().await;

    let first = app
        .publish(
            EVENT,
            "u",
            json!({"email": "x@y.z", "first_name": "X"}),
            None,
        )
        .await;
    let first_runs = app.wait_for_runs(&first, 1, RunStatus::Succeeded).await;
    let second = app
        .publish(
            EVENT,
            "u",
            json!({"email": "x@y.z", "first_name": "Xavier"}),
            None,
        )
        .await;
    let second_runs = app.wait_for_runs(&second, 1, RunStatus::Succeeded).await;

    assert_eq!(first_runs[0].provider_id, second_runs[0].provider_id);
    let records = crm.standin.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].fields["firstname"], "Xavier");
    // Both creates go out through HubSpot's batch endpoint; the second's answer (207) names
    // the existing contact, which is then updated.
    let statuses: Vec<u16> = crm.standin.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![201, 207, 200]);
    app.cleanup().await;
}

#[tokio::test]
async fn unmatched_events_are_acknowledged_and_nothing_is_called() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    two_workflows(&app, "subscribed-user", &crm.url()).await;
    app.start_worker().await;

    app.publish("No Such Event", "subscribed-user", json!({}), None)
        .await;
    app.publish(
        EVENT,
        "user-without-subscriptions",
        json!({"email": "a@b.c"}),
        None,
    )
    .await;

    let counted = eventually(Duration::from_secs(10), || async {
        let metrics = app.metrics().await;
        metrics.contains(r#"appevents_unmatched_events_total{reason="unknown_event"} 1"#)
            && metrics.contains(r#"appevents_unmatched_events_total{reason="no_subscription"} 1"#)
    })
    .await;
    assert!(counted, "both events counted as unmatched");
    let queue = app.settings.amqp.queue.clone();
    assert_eq!(
        app.unacknowledged_after_stop(&queue).await,
        0,
        "both acknowledged"
    );
    assert!(
        app.take_dead_letters().await.is_empty(),
        "unmatched is not dead-lettered"
    );
    assert!(crm.standin.requests().is_empty(), "no CRM was called");
    assert!(app.all_runs().await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn each_kind_of_invalid_message_is_dead_lettered_with_its_reason_and_good_events_still_flow()
{
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::with_settings(|s| s.worker.max_message_bytes = 4096).await;
    two_workflows(&app, "u", &crm.url()).await;
    app.start_worker().await;

    let json = || BasicProperties::default().with_content_type("application/json".into());
    let cases: Vec<(&[u8], BasicProperties, &str)> = vec![
        (b"not json at all", json(), "is not JSON"),
        (b"[1, 2, 3]", json(), "a JSON array, not an object"),
        (b"null", json(), "a JSON null, not an object"),
        (
            br#"{"user_id":"u","payload":{}}"#,
            json(),
            "field `name` is missing",
        ),
        (
            br#"{"name":"Contact Created","payload":{}}"#,
            json(),
            "field `user_id` is missing",
        ),
        (
            br#"{"name":"Contact Created","user_id":"u"}"#,
            json(),
            "field `payload` is missing",
        ),
        (
            br#"{"name":"Contact Created","user_id":"u","payload":"x"}"#,
            json(),
            "field `payload` must be an object, found string",
        ),
        (
            br#"{"name":"","user_id":"u","payload":{}}"#,
            json(),
            "field `name` is empty",
        ),
        (&[0xff, 0xfe, b'{'], json(), "not valid UTF-8"),
        (
            br#"{"name":"Contact Created","user_id":"u","payload":{}}"#,
            BasicProperties::default().with_content_type("text/plain".into()),
            "is not application/json",
        ),
    ];
    let big = format!(
        r#"{{"name":"Contact Created","user_id":"u","payload":{{"x":"{}"}}}}"#,
        "a".repeat(5000)
    );
    for (body, properties, _) in &cases {
        app.publish_raw(EVENT, body, properties.clone()).await;
    }
    app.publish_raw(EVENT, big.as_bytes(), json()).await;
    let good = app
        .publish(
            EVENT,
            "u",
            json!({"email": "good@example.com", "last_name": "Good"}),
            None,
        )
        .await;

    app.wait_for_runs(&good, 2, RunStatus::Succeeded).await;
    let letters = app.dead_letters_until(11, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 11, "11 dead letters");
    let reasons: Vec<String> = letters
        .iter()
        .map(|l| l.header("x-appevents-reason").expect("reason header"))
        .collect();
    for (body, _, expected) in &cases {
        let found = letters
            .iter()
            .zip(&reasons)
            .any(|(l, r)| l.body == *body && r.contains(expected));
        assert!(
            found,
            "{expected:?} for {:?} not among {reasons:#?}",
            String::from_utf8_lossy(body)
        );
    }
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("over the 4096-byte limit")),
        "{reasons:#?}"
    );
    for letter in &letters {
        assert_eq!(
            letter.header("x-appevents-reason-code").as_deref(),
            Some("invalid")
        );
    }
    let queue = app.settings.amqp.queue.clone();
    assert_eq!(app.unacknowledged_after_stop(&queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn the_same_event_id_published_twice_creates_one_contact_per_workflow() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    two_workflows(&app, "u", &crm.url()).await;
    app.start_worker().await;

    let payload = json!({"email": "twice@example.com", "last_name": "Twice"});
    app.publish(EVENT, "u", payload.clone(), Some("evt-twice"))
        .await;
    app.publish(EVENT, "u", payload, Some("evt-twice")).await;

    app.wait_for_runs("evt-twice", 2, RunStatus::Succeeded)
        .await;
    let metrics_seen = eventually(Duration::from_secs(10), || async {
        let text = app.metrics().await;
        text.contains(r#"appevents_events_total{outcome="processed"} 2"#)
    })
    .await;
    assert!(metrics_seen, "both copies processed");
    let queue = app.settings.amqp.queue.clone();
    assert_eq!(
        app.unacknowledged_after_stop(&queue).await,
        0,
        "both copies acknowledged"
    );
    let records = crm.standin.records();
    assert_eq!(records.len(), 2, "one contact per workflow: {records:#?}");
    assert!(records.iter().all(|r| r.creates == 1 && r.updates == 0));
    assert_eq!(app.runs("evt-twice").await.len(), 2);
    app.cleanup().await;
}

#[tokio::test]
async fn a_users_event_only_uses_that_users_connections() {
    let crm_a = standin::spawn("127.0.0.1:0").await.expect("stand-in a");
    let crm_b = standin::spawn("127.0.0.1:0").await.expect("stand-in b");
    let mut app = TestApp::new().await;
    app.app_event(EVENT).await;
    // One shared workflow definition, switched on by both users with their own connections.
    let shared = app
        .workflow(
            "shared",
            EVENT,
            Provider::Hubspot,
            "create-contact",
            json!({}),
            hubspot_mapping(),
        )
        .await;
    let only_b = app
        .workflow(
            "only b",
            EVENT,
            Provider::Salesforce,
            "create",
            json!({}),
            salesforce_mapping(),
        )
        .await;
    let a_conn = app
        .connection("user-a", Provider::Hubspot, &crm_a.url(), "token-a")
        .await;
    let b_conn = app
        .connection("user-b", Provider::Hubspot, &crm_b.url(), "token-b")
        .await;
    let b_sf = app
        .connection("user-b", Provider::Salesforce, &crm_b.url(), "token-b-sf")
        .await;
    app.subscribe("user-a", shared.id, a_conn).await;
    app.subscribe("user-b", shared.id, b_conn).await;
    app.subscribe("user-b", only_b.id, b_sf).await;
    crm_a.standin.set_tokens(appevents_standin::Tokens {
        valid_access: Some(vec!["token-a".into()]),
        ..Default::default()
    });
    crm_b.standin.set_tokens(appevents_standin::Tokens {
        valid_access: Some(vec!["token-b".into(), "token-b-sf".into()]),
        ..Default::default()
    });
    app.start_worker().await;

    let id = app
        .publish(
            EVENT,
            "user-a",
            json!({"email": "a@a.a", "last_name": "A"}),
            None,
        )
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;

    assert_eq!(runs.len(), 1, "only user A's subscription ran: {runs:#?}");
    assert_eq!(runs[0].workflow_id, shared.id);
    assert_eq!(runs[0].connection_id, Some(a_conn));
    assert_eq!(crm_a.standin.records().len(), 1);
    assert!(
        crm_b.standin.requests().is_empty(),
        "user B's CRM was never called"
    );

    // The database refuses a subscription that binds user A to user B's connection.
    let refused =
        appevents::catalog::subscriptions::create(&app.pool, "user-a", only_b.id, b_sf).await;
    assert!(refused.is_err(), "cross-tenant binding refused");
    let client = app.pool.get().await.expect("client");
    let direct = client
        .execute(
            "insert into subscriptions (id, user_id, workflow_id, connection_id) values ($1, 'user-a', $2, $3)",
            &[&uuid::Uuid::now_v7(), &only_b.id, &b_sf],
        )
        .await;
    assert!(
        direct.is_err(),
        "the foreign key refuses it even without the application"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn mapping_rules_hold_end_to_end_including_missing_paths() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.app_event(EVENT).await;
    let hook = app
        .workflow(
            "hook",
            EVENT,
            Provider::Http,
            "request",
            json!({"url": "/hooks/{{user_id}}/{{payload.email}}", "method": "POST", "headers": {"x-event": "{{name}}"}}),
            json!({
                "email": "{{payload.email}}",
                "age": "{{payload.age}}",
                "tags": "{{payload.tags}}",
                "city": "{{payload.address.city}}",
                "missing": "{{payload.nope}}",
                "greeting": "Hello {{payload.first_name}} {{payload.nope}}!",
                "event": {"id": "{{id}}", "name": "{{name}}"},
                "constant": 42
            }),
        )
        .await;
    let conn = app
        .connection("u", Provider::Http, &crm.url(), "hook-token")
        .await;
    app.subscribe("u", hook.id, conn).await;
    app.start_worker().await;

    let id = app
        .publish(
            EVENT,
            "u",
            json!({"email": "m@x.io", "age": 36, "tags": ["a"], "address": {"city": "Paris"}, "first_name": "Marie"}),
            Some("evt-map"),
        )
        .await;
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;

    let records = crm.standin.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].object, "/hooks/u/m%40x.io");
    assert_eq!(
        Value::Object(records[0].fields.clone()),
        json!({
            "email": "m@x.io",
            "age": 36,
            "tags": ["a"],
            "city": "Paris",
            "greeting": "Hello Marie !",
            "event": {"id": "evt-map", "name": "Contact Created"},
            "constant": 42
        })
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_committed_subscription_change_reaches_the_cached_resolver() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.app_event(EVENT).await;
    let hs = app
        .workflow(
            "hs",
            EVENT,
            Provider::Hubspot,
            "create-contact",
            json!({}),
            hubspot_mapping(),
        )
        .await;
    let conn = app
        .connection("u", Provider::Hubspot, &crm.url(), "t")
        .await;
    app.start_worker().await;
    let resolver = app.worker().context.resolver.clone();
    let caching = eventually(Duration::from_secs(10), || async { resolver.is_caching() }).await;
    assert!(caching, "the change listener is up");

    // Unmatched: the worker caches "no subscription" for (u, Contact Created).
    app.publish(
        EVENT,
        "u",
        json!({"email": "before@example.com"}),
        Some("before"),
    )
    .await;
    let counted = eventually(Duration::from_secs(10), || async {
        app.worker()
            .context
            .metrics
            .unmatched
            .get_or_create(&vec![("reason", "no_subscription".to_owned())])
            .get()
            == 1
    })
    .await;
    assert!(counted);

    let generation = resolver.generation();
    app.subscribe("u", hs.id, conn).await;
    let notified = eventually(Duration::from_secs(10), || async {
        resolver.generation() > generation
    })
    .await;
    assert!(notified, "the commit's notification cleared the cache");

    let id = app
        .publish(
            EVENT,
            "u",
            json!({"email": "after@example.com"}),
            Some("after"),
        )
        .await;
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    assert!(app.runs("before").await.is_empty());
    app.cleanup().await;
}
