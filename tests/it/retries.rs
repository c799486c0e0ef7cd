//! Retries, rate limits, credentials and dead letters against scripted CRMs (wiremock).

use std::time::{Duration, Instant};

use appevents::catalog::connections::{self as connection, NewConnection};
use appevents::core::connection::ConnectionStatus;
use appevents::core::provider::Provider;
use appevents::pipeline::runs::RunStatus;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, header, method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{TestApp, answer, eventually};

const EVENT: &str = "Contact Created";
const CONTACTS: &str = "/crm/v3/objects/contacts";
const SOBJECT: &str = r"^/services/data/v[0-9.]+/sobjects/Contact/$";

fn created(id: &str) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({"id": id, "success": true, "errors": []}))
}

fn hubspot_error(status: u16, category: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(
        json!({"status": "error", "message": format!("scripted {status}"), "category": category}),
    )
}

async fn salesforce_workflow(
    app: &TestApp,
    crm: &str,
    connection: Option<uuid::Uuid>,
) -> uuid::Uuid {
    let workflow = app
        .workflow(
            "sf",
            EVENT,
            Provider::Salesforce,
            "create",
            json!({}),
            json!({"LastName": "{{payload.last_name}}"}),
        )
        .await;
    let conn = match connection {
        Some(id) => id,
        None => {
            app.connection("u", Provider::Salesforce, crm, "token")
                .await
        }
    };
    app.subscribe("u", workflow.id, conn).await;
    workflow.id
}

#[tokio::test]
async fn transient_errors_are_retried_in_process_then_succeed() {
    let crm = MockServer::start().await;
    answer(
        &crm,
        "POST",
        path(CONTACTS),
        hubspot_error(500, "INTERNAL_ERROR"),
        2,
        true,
    )
    .await;
    answer(&crm, "POST", path(CONTACTS), created("7"), 1, false).await;
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.uri()).await;
    app.start_worker().await;

    let id = app
        .publish(EVENT, "u", json!({"email": "a@b.c"}), None)
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;

    assert_eq!(runs[0].attempts, 3);
    assert_eq!(runs[0].provider_id.as_deref(), Some("7"));
    assert!(
        !app.metrics().await.contains("appevents_retries_total{"),
        "no broker-level retry was needed"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn failures_past_the_in_process_tries_wait_in_the_retry_queue() {
    let crm = MockServer::start().await;
    answer(
        &crm,
        "POST",
        path(CONTACTS),
        hubspot_error(503, "INTERNAL_ERROR"),
        4,
        true,
    )
    .await;
    answer(&crm, "POST", path(CONTACTS), created("8"), 1, false).await;
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.uri()).await;
    app.start_worker().await;

    let id = app
        .publish(EVENT, "u", json!({"email": "a@b.c"}), None)
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;

    assert_eq!(
        runs[0].attempts, 5,
        "three in process, then two after the first broker retry"
    );
    assert!(
        app.metrics()
            .await
            .contains(r#"appevents_retries_total{kind="transient"} 1"#)
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_short_retry_after_is_waited_in_process() {
    let crm = MockServer::start().await;
    answer(
        &crm,
        "POST",
        path(CONTACTS),
        hubspot_error(429, "RATE_LIMITS").insert_header("Retry-After", "1"),
        1,
        true,
    )
    .await;
    answer(&crm, "POST", path(CONTACTS), created("9"), 1, false).await;
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.uri()).await;
    app.start_worker().await;

    let started = Instant::now();
    let id = app
        .publish(EVENT, "u", json!({"email": "a@b.c"}), None)
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;

    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    assert_eq!(runs[0].attempts, 2);
    app.cleanup().await;
}

#[tokio::test]
async fn a_salesforce_request_limit_backs_off_through_the_broker() {
    let crm = MockServer::start().await;
    answer(&crm, "POST", path_regex(SOBJECT), ResponseTemplate::new(403).set_body_json(json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}])), 1, true).await;
    answer(&crm, "POST", path_regex(SOBJECT), created("003A"), 1, false).await;
    let mut app = TestApp::new().await;
    app.app_event(EVENT).await;
    salesforce_workflow(&app, &crm.uri(), None).await;
    app.start_worker().await;

    let started = Instant::now();
    let id = app
        .publish(EVENT, "u", json!({"last_name": "L"}), None)
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;

    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "waited at least retry.rate_limited_min_delay"
    );
    assert_eq!(
        runs[0].attempts, 2,
        "not retried in process without a Retry-After"
    );
    assert!(
        app.metrics()
            .await
            .contains(r#"appevents_retries_total{kind="rate_limited"} 1"#)
    );
    app.cleanup().await;
}

/// `Contact Created` with a HubSpot create-contact workflow on for user "u", through a
/// connection with OAuth refresh against `crm`'s /oauth/token. Returns the connection.
async fn refreshable_hubspot_workflow(app: &TestApp, crm: &str) -> uuid::Uuid {
    app.app_event(EVENT).await;
    let workflow = app
        .workflow(
            "hs",
            EVENT,
            Provider::Hubspot,
            "create-contact",
            json!({}),
            json!({"email": "{{payload.email}}"}),
        )
        .await;
    let conn = refreshable_connection(app, crm).await;
    app.subscribe("u", workflow.id, conn).await;
    conn
}

/// A HubSpot connection with OAuth refresh against `crm`'s /oauth/token.
async fn refreshable_connection(app: &TestApp, crm: &str) -> uuid::Uuid {
    app.connection_with(NewConnection {
        user_id: "u".into(),
        provider: Provider::Hubspot,
        base_url: crm.to_owned(),
        settings: json!({}),
        access_token: Some(SecretString::from("old-access")),
        refresh_token: Some(SecretString::from("refresh-1")),
        token_url: Some(format!("{crm}/oauth/token")),
        client_id: Some("client".into()),
        client_secret: Some(SecretString::from("client-secret")),
    })
    .await
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_and_the_rotated_refresh_token_stored() {
    let crm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(CONTACTS))
        .and(header("authorization", "Bearer old-access"))
        .respond_with(hubspot_error(401, "EXPIRED_AUTHENTICATION"))
        .mount(&crm)
        .await;
    Mock::given(method("POST"))
        .and(path(CONTACTS))
        .and(header("authorization", "Bearer new-access"))
        .respond_with(created("10"))
        .expect(5)
        .mount(&crm)
        .await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .and(body_string_contains("grant_type=refresh_token"))
        .and(body_string_contains("refresh_token=refresh-1"))
        .and(body_string_contains("client_secret=client-secret"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"access_token": "new-access", "refresh_token": "refresh-2", "token_type": "Bearer"})))
        .expect(1)
        .named("one refresh for five concurrent runs")
        .mount(&crm)
        .await;
    let mut app = TestApp::new().await;
    let conn = refreshable_hubspot_workflow(&app, &crm.uri()).await;
    app.start_worker().await;

    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            app.publish(EVENT, "u", json!({"email": format!("{n}@b.c")}), None)
                .await,
        );
    }
    for id in &ids {
        app.wait_for_runs(id, 1, RunStatus::Succeeded).await;
    }

    let stored = connection::get(&app.pool, &app.keyring, conn)
        .await
        .expect("connection");
    assert_eq!(
        stored
            .access_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned())
            .as_deref(),
        Some("new-access")
    );
    assert_eq!(
        stored
            .refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned())
            .as_deref(),
        Some("refresh-2")
    );
    assert_eq!(stored.status, ConnectionStatus::Active);
    let client = app.pool.get().await.expect("client");
    let raw: Vec<u8> = client
        .query_one(
            "select refresh_token from connections where id = $1",
            &[&conn],
        )
        .await
        .expect("row")
        .get(0);
    assert!(
        !raw.windows(9).any(|w| w == b"refresh-2"),
        "stored encrypted"
    );
    assert!(
        app.metrics()
            .await
            .contains(r#"appevents_token_refreshes_total{result="refreshed"}"#)
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_refresh_holds_no_row_lock_or_pooled_connection_while_the_token_endpoint_answers() {
    let crm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(CONTACTS))
        .and(header("authorization", "Bearer old-access"))
        .respond_with(hubspot_error(401, "EXPIRED_AUTHENTICATION"))
        .mount(&crm)
        .await;
    Mock::given(method("POST"))
        .and(path(CONTACTS))
        .and(header("authorization", "Bearer new-access"))
        .respond_with(created("11"))
        .expect(1)
        .mount(&crm)
        .await;
    // A slow token endpoint: the refresh is in flight for two seconds.
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "new-access", "refresh_token": "refresh-2"}))
                .set_delay(Duration::from_secs(2)),
        )
        .expect(1)
        .mount(&crm)
        .await;
    let mut app = TestApp::new().await;
    let conn = refreshable_hubspot_workflow(&app, &crm.uri()).await;
    app.start_worker().await;

    let id = app
        .publish(EVENT, "u", json!({"email": "slow@b.c"}), None)
        .await;
    let refreshing = eventually(Duration::from_secs(10), || async {
        crm.received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .any(|request| request.url.path() == "/oauth/token")
    })
    .await;
    assert!(refreshing, "the refresh reached the token endpoint");

    // While the token endpoint is answering, the connection's row is free and the worker
    // holds no pooled connection for it.
    let mut client = app.pool.get().await.expect("client");
    let tx = client.transaction().await.expect("transaction");
    let locked = tx
        .query_one(
            "select id from connections where id = $1 for update nowait",
            &[&conn],
        )
        .await;
    assert!(locked.is_ok(), "the row is not locked: {locked:?}");
    drop(tx);
    let pool = app.worker().context.pool.status();
    assert_eq!(
        pool.size - pool.available,
        0,
        "no pooled connection in use during the call: {pool:?}"
    );

    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    let stored = connection::get(&app.pool, &app.keyring, conn)
        .await
        .expect("connection");
    assert_eq!(
        stored.access_token.as_ref().map(|t| t.expose_secret()),
        Some("new-access")
    );
    assert_eq!(
        stored.refresh_token.as_ref().map(|t| t.expose_secret()),
        Some("refresh-2")
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_revoked_refresh_token_marks_the_connection_and_its_runs_fail_permanently() {
    let crm = MockServer::start().await;
    answer(
        &crm,
        "POST",
        path(CONTACTS),
        hubspot_error(401, "EXPIRED_AUTHENTICATION"),
        1,
        false,
    )
    .await;
    answer(
        &crm,
        "POST",
        path("/oauth/token"),
        ResponseTemplate::new(400).set_body_json(
            json!({"error": "invalid_grant", "error_description": "expired access/refresh token"}),
        ),
        1,
        false,
    )
    .await;
    let mut app = TestApp::new().await;
    refreshable_hubspot_workflow(&app, &crm.uri()).await;
    app.start_worker().await;

    let first = app
        .publish(EVENT, "u", json!({"email": "a@b.c"}), None)
        .await;
    let runs = app.wait_for_runs(&first, 1, RunStatus::Dead).await;
    let error: Value = runs[0].last_error.clone().expect("last error");
    assert_eq!(error["kind"], "revoked_credentials");
    assert_eq!(error["code"], "invalid_grant");

    let listed = connection::list(&app.pool, Some("u")).await.expect("list");
    assert_eq!(listed[0].status, ConnectionStatus::NeedsReauth);
    assert!(
        listed[0]
            .status_reason
            .as_deref()
            .is_some_and(|r| r.contains("invalid_grant"))
    );

    // Later events fail at once with that reason, without calling the CRM again.
    let second = app
        .publish(EVENT, "u", json!({"email": "d@e.f"}), None)
        .await;
    let runs = app.wait_for_runs(&second, 1, RunStatus::Dead).await;
    assert_eq!(runs[0].attempts, 0);
    assert!(runs[0].last_error.as_ref().is_some_and(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs re-authorisation"))
    }));
    let letters = app.dead_letters_until(2, Duration::from_secs(5)).await;
    assert_eq!(letters.len(), 2);
    assert!(
        letters
            .iter()
            .all(|l| l.header("x-appevents-error-kind").as_deref() == Some("revoked_credentials"))
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_permanent_error_goes_straight_to_the_dead_letter_queue_with_its_reason() {
    let crm = MockServer::start().await;
    answer(&crm, "POST", path_regex(SOBJECT), ResponseTemplate::new(400).set_body_json(json!([{"message": "Use one of these records?", "errorCode": "DUPLICATES_DETECTED", "fields": []}])), 1, false).await;
    let mut app = TestApp::new().await;
    app.app_event(EVENT).await;
    let workflow = salesforce_workflow(&app, &crm.uri(), None).await;
    app.start_worker().await;

    let id = app
        .publish(EVENT, "u", json!({"last_name": "Dup"}), Some("evt-dup"))
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Dead).await;
    assert_eq!(runs[0].attempts, 1);

    let letters = app.dead_letters_until(1, Duration::from_secs(5)).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        letter.header("x-appevents-event-id").as_deref(),
        Some("evt-dup")
    );
    assert_eq!(
        letter.header("x-appevents-event-name").as_deref(),
        Some(EVENT)
    );
    assert_eq!(letter.header("x-appevents-user-id").as_deref(), Some("u"));
    assert_eq!(
        letter.header("x-appevents-workflow-id"),
        Some(workflow.to_string())
    );
    assert_eq!(letter.header("x-appevents-attempts").as_deref(), Some("1"));
    assert_eq!(
        letter.header("x-appevents-error-status").as_deref(),
        Some("400")
    );
    assert_eq!(
        letter.header("x-appevents-error-code").as_deref(),
        Some("DUPLICATES_DETECTED")
    );
    assert_eq!(
        letter.header("x-appevents-reason-code").as_deref(),
        Some("permanent")
    );
    let reason = letter.header("x-appevents-reason").expect("reason");
    assert!(
        reason.contains("DUPLICATES_DETECTED") && reason.contains("Use one of these records?"),
        "{reason}"
    );
    assert!(letter.header("x-appevents-dead-lettered-at").is_some());
    let body: Value = serde_json::from_slice(&letter.body).expect("original body");
    assert_eq!(body["id"], "evt-dup");
    app.cleanup().await;
}

#[tokio::test]
async fn only_the_failing_workflow_of_an_event_is_retried() {
    let crm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(CONTACTS))
        .respond_with(created("11"))
        .expect(1)
        .named("hubspot once")
        .mount(&crm)
        .await;
    answer(
        &crm,
        "POST",
        path_regex(SOBJECT),
        ResponseTemplate::new(502),
        4,
        true,
    )
    .await;
    answer(&crm, "POST", path_regex(SOBJECT), created("003B"), 1, false).await;
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.uri()).await;
    salesforce_workflow(&app, &crm.uri(), None).await;
    app.start_worker().await;

    let id = app
        .publish(
            EVENT,
            "u",
            json!({"email": "a@b.c", "last_name": "L"}),
            None,
        )
        .await;
    let runs = app.wait_for_runs(&id, 2, RunStatus::Succeeded).await;
    let attempts: Vec<(String, i32)> = runs
        .iter()
        .map(|r| (r.workflow.clone(), r.attempts))
        .collect();
    assert!(attempts.contains(&("hs".to_owned(), 1)), "{attempts:?}");
    assert!(attempts.contains(&("sf".to_owned(), 5)), "{attempts:?}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_run_that_keeps_failing_is_dead_lettered_after_the_schedule() {
    let crm = MockServer::start().await;
    answer(
        &crm,
        "POST",
        path(CONTACTS),
        hubspot_error(500, "INTERNAL_ERROR"),
        9,
        false,
    )
    .await;
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.uri()).await;
    app.start_worker().await;

    let id = app
        .publish(EVENT, "u", json!({"email": "a@b.c"}), None)
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Dead).await;
    assert_eq!(
        runs[0].attempts, 9,
        "three tries on each of three deliveries"
    );

    let letters = app.dead_letters_until(1, Duration::from_secs(5)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].header("x-appevents-reason-code").as_deref(),
        Some("exhausted")
    );
    assert_eq!(
        letters[0].header("x-appevents-attempts").as_deref(),
        Some("9")
    );
    let queue = app.settings.amqp.queue.clone();
    assert_eq!(
        app.unacknowledged_after_stop(&queue).await,
        0,
        "acknowledged once dead-lettered"
    );
    app.cleanup().await;
}
