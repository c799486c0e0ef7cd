//! The management API: every route with good input, bad input, and without a key.

use appevents::run::RunStatus;
use appevents::standin;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{CONTACT_CREATED, ServerHandle, TestApp, http_client};

async fn call(
    server: &ServerHandle,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = server.request(method, path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_management_api_end_to_end() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    let server = ServerHandle::start(&app.settings).await;
    app.start_worker().await;
    use Method as M;

    // App events.
    let (status, _) = call(
        &server,
        M::POST,
        "/v1/app-events",
        Some(json!({"name": CONTACT_CREATED, "schema": {"email": "a@b.c"}})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, body) = call(
        &server,
        M::POST,
        "/v1/app-events",
        Some(json!({"name": "Bad", "schema": [1]})),
    )
    .await;
    assert_eq!(
        (
            status,
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("JSON object"))
        ),
        (400, true),
        "{body}"
    );
    let (status, _) = call(
        &server,
        M::POST,
        "/v1/app-events",
        Some(json!({"name": CONTACT_CREATED, "schema": {}})),
    )
    .await;
    assert_eq!(status, 409, "duplicate name");
    let (status, body) = call(
        &server,
        M::POST,
        "/v1/app-events",
        Some(json!({"nom": "x"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(&server, M::GET, "/v1/app-events", None).await;
    assert_eq!((status, body.as_array().map(Vec::len)), (200, Some(1)));
    let (status, body) = call(&server, M::GET, "/v1/app-events/Contact%20Created", None).await;
    assert_eq!(
        (status, body["schema"].clone()),
        (200, json!({"email": "a@b.c"}))
    );
    let (status, _) = call(&server, M::GET, "/v1/app-events/Nope", None).await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &server,
        M::PATCH,
        "/v1/app-events/Contact%20Created",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = call(
        &server,
        M::PATCH,
        "/v1/app-events/Contact%20Created",
        Some(json!({"payload_check": "warn"})),
    )
    .await;
    assert_eq!(
        (status, body["payload_check"].clone()),
        (200, json!("warn"))
    );
    let (status, _) = call(
        &server,
        M::PATCH,
        "/v1/app-events/Contact%20Created",
        Some(json!({"payload_check": "sometimes"})),
    )
    .await;
    assert_eq!(status, 400);

    // Workflows.
    let mapping = json!({"email": "{{payload.email}}"});
    let (status, workflow) = call(
        &server,
        M::POST,
        "/v1/workflows",
        Some(json!({"name": "hs", "event": CONTACT_CREATED, "provider": "hubspot", "action": "create-contact", "mapping": mapping})),
    )
    .await;
    assert_eq!(status, 201, "{workflow}");
    let workflow_id = workflow["id"].as_str().expect("id").to_owned();
    let (status, body) = call(
        &server,
        M::POST,
        "/v1/workflows",
        Some(json!({"name": "bad", "event": CONTACT_CREATED, "provider": "hubspot", "action": "create-contact", "mapping": {"x": "{{env.HOME}}"}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = call(
        &server,
        M::POST,
        "/v1/workflows",
        Some(json!({"name": "w", "event": CONTACT_CREATED, "provider": "myspace", "action": "x", "mapping": {}})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = call(
        &server,
        M::GET,
        &format!("/v1/workflows?event={}", "Contact%20Created"),
        None,
    )
    .await;
    assert_eq!((status, body.as_array().map(Vec::len)), (200, Some(1)));
    let (status, body) = call(
        &server,
        M::PATCH,
        &format!("/v1/workflows/{workflow_id}"),
        Some(json!({"name": "to hubspot"})),
    )
    .await;
    assert_eq!((status, body["name"].clone()), (200, json!("to hubspot")));
    let (status, _) = call(&server, M::GET, "/v1/workflows/not-a-uuid", None).await;
    assert_eq!(status, 404);
    let (status, _) = call(&server, M::DELETE, "/v1/app-events/Contact%20Created", None).await;
    assert_eq!(status, 409, "an app event with workflows cannot be deleted");

    // A user's connection, switched on, an event, runs.
    let (status, conn) = call(
        &server,
        M::POST,
        "/v1/users/user-9/connections",
        Some(
            json!({"provider": "hubspot", "base_url": crm.url(), "access_token": "secret-token-9"}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{conn}");
    let connection_id = conn["id"].as_str().expect("id").to_owned();
    let (status, _) = call(
        &server,
        M::POST,
        "/v1/users/user-9/connections",
        Some(json!({"provider": "hubspot", "base_url": "not a url"})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, listed) = call(&server, M::GET, "/v1/users/user-9/connections", None).await;
    assert_eq!(status, 200);
    assert!(
        !listed.to_string().contains("secret-token-9"),
        "secrets never listed: {listed}"
    );
    assert_eq!(listed[0]["has_access_token"], true);

    let (status, off) = call(&server, M::GET, "/v1/users/user-9/workflows", None).await;
    assert_eq!((status, off[0]["enabled"].clone()), (200, json!(false)));
    let (status, body) = call(
        &server,
        M::POST,
        &format!("/v1/users/user-9/workflows/{workflow_id}"),
        Some(json!({"connection_id": connection_id})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, on) = call(&server, M::GET, "/v1/users/user-9/workflows", None).await;
    assert_eq!(
        (
            status,
            on[0]["enabled"].clone(),
            on[0]["connection_id"].clone()
        ),
        (200, json!(true), json!(connection_id))
    );
    let (status, _) = call(
        &server,
        M::POST,
        &format!("/v1/users/other-user/workflows/{workflow_id}"),
        Some(json!({"connection_id": connection_id})),
    )
    .await;
    assert_eq!(status, 404, "another user's connection cannot be bound");
    let (status, _) = call(
        &server,
        M::POST,
        &format!("/v1/users/user-9/workflows/{workflow_id}"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 400);

    let (status, _) = server_event(&server, "evt-api").await;
    assert_eq!(status, 201);
    app.wait_for_runs("evt-api", 1, RunStatus::Succeeded).await;
    let (status, runs) = call(
        &server,
        M::GET,
        "/v1/users/user-9/runs?status=succeeded",
        None,
    )
    .await;
    assert_eq!((status, runs.as_array().map(Vec::len)), (200, Some(1)));
    let (status, _) = call(
        &server,
        M::GET,
        "/v1/users/user-9/runs?status=exploded",
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(&server, M::GET, "/v1/users/user-9/runs?limit=0", None).await;
    assert_eq!(status, 400);

    // Replace the credentials; switch off; delete.
    let (status, _) = call(
        &server,
        M::PUT,
        &format!("/v1/users/user-9/connections/{connection_id}"),
        Some(json!({"provider": "hubspot", "base_url": crm.url(), "access_token": "rotated"})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &server,
        M::PUT,
        &format!("/v1/users/someone-else/connections/{connection_id}"),
        Some(json!({"provider": "hubspot", "base_url": crm.url(), "access_token": "x"})),
    )
    .await;
    assert_eq!(
        status, 404,
        "a user cannot replace another user's connection"
    );
    let (status, _) = call(
        &server,
        M::DELETE,
        &format!("/v1/users/user-9/workflows/{workflow_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(
        &server,
        M::DELETE,
        &format!("/v1/users/user-9/workflows/{workflow_id}"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &server,
        M::DELETE,
        &format!("/v1/users/user-9/connections/{connection_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(
        &server,
        M::DELETE,
        &format!("/v1/workflows/{workflow_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(&server, M::DELETE, "/v1/app-events/Contact%20Created", None).await;
    assert_eq!(status, 204);

    // Every route refuses a request without a key.
    for (method, path) in [
        (M::GET, "/v1/app-events"),
        (M::POST, "/v1/app-events"),
        (M::GET, "/v1/workflows"),
        (M::POST, "/v1/workflows"),
        (M::GET, "/v1/users/u/connections"),
        (M::POST, "/v1/users/u/connections"),
        (M::GET, "/v1/users/u/workflows"),
        (M::GET, "/v1/users/u/runs"),
        (M::POST, "/v1/events"),
    ] {
        let response = http_client()
            .request(method.clone(), format!("{}{path}", server.url))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 401, "{method} {path}");
    }
    server.stop().await;
    app.cleanup().await;
}

async fn server_event(server: &ServerHandle, id: &str) -> (u16, Value) {
    let response = server
        .post("/v1/events")
        .json(&json!({"name": CONTACT_CREATED, "user_id": "user-9", "payload": {"email": "api@example.com"}, "id": id}))
        .send()
        .await
        .expect("post");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}
