//! The management API: each route group with good and bad input, one test per concern;
//! every documented route without a key; and docs/openapi.json kept true to docs/api.md and
//! to the routes the server has.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use appevents::pipeline::runs::RunStatus;
use appevents_standin as standin;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{CONTACT_CREATED, ServerHandle, TestApp, http_client};

pub async fn call(
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

/// `Contact Created` with a HubSpot workflow, defined over the API; returns the workflow id.
async fn app_event_and_workflow(server: &ServerHandle) -> String {
    let (status, _) = call(
        server,
        Method::POST,
        "/v1/app-events",
        Some(json!({"name": CONTACT_CREATED, "schema": {"email": "a@b.c"}})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, workflow) = call(
        server,
        Method::POST,
        "/v1/workflows",
        Some(json!({"name": "hs", "event": CONTACT_CREATED, "provider": "hubspot", "action": "create-contact", "mapping": {"email": "{{payload.email}}"}})),
    )
    .await;
    assert_eq!(status, 201, "{workflow}");
    workflow["id"].as_str().expect("id").to_owned()
}

/// A HubSpot connection of `user` to `base_url`, created over the API; returns its id.
async fn user_connection(server: &ServerHandle, user: &str, base_url: &str) -> String {
    let (status, conn) = call(
        server,
        Method::POST,
        &format!("/v1/users/{user}/connections"),
        Some(
            json!({"provider": "hubspot", "base_url": base_url, "access_token": "secret-token-9"}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{conn}");
    conn["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn app_events_are_defined_listed_and_changed() {
    let app = TestApp::new().await;
    let server = ServerHandle::start(&app.settings).await;
    use Method as M;

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
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn workflows_are_defined_checked_changed_and_deleted() {
    let app = TestApp::new().await;
    let server = ServerHandle::start(&app.settings).await;
    use Method as M;
    let workflow_id = app_event_and_workflow(&server).await;

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
        "/v1/workflows?event=Contact%20Created",
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
    let (status, body) = call(
        &server,
        M::PATCH,
        &format!("/v1/workflows/{workflow_id}"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 400, "an empty update is refused");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("nothing to update")),
        "{body}"
    );
    let (status, _) = call(&server, M::GET, "/v1/workflows/not-a-uuid", None).await;
    assert_eq!(status, 404);
    let (status, _) = call(&server, M::DELETE, "/v1/app-events/Contact%20Created", None).await;
    assert_eq!(status, 409, "an app event with workflows cannot be deleted");
    let (status, _) = call(
        &server,
        M::DELETE,
        &format!("/v1/workflows/{workflow_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(&server, M::DELETE, "/v1/app-events/Contact%20Created", None).await;
    assert_eq!(status, 204, "deletable once its workflows are gone");
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn what_the_extractors_refuse_is_a_json_error_like_every_other() {
    let app = TestApp::new().await;
    let server = ServerHandle::start(&app.settings).await;

    for path in ["/v1/workflows?event=a&event=b", "/v1/app-events/%FF"] {
        let (status, body) = call(&server, Method::GET, path, None).await;

        assert_eq!(status, 400, "{path}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_users_connections_are_created_listed_without_secrets_replaced_and_deleted() {
    let app = TestApp::new().await;
    let server = ServerHandle::start(&app.settings).await;
    use Method as M;
    let base_url = "http://127.0.0.1:9";
    let connection_id = user_connection(&server, "user-9", base_url).await;

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
    let (status, _) = call(
        &server,
        M::PUT,
        &format!("/v1/users/user-9/connections/{connection_id}"),
        Some(json!({"provider": "hubspot", "base_url": base_url, "access_token": "rotated"})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &server,
        M::PUT,
        &format!("/v1/users/someone-else/connections/{connection_id}"),
        Some(json!({"provider": "hubspot", "base_url": base_url, "access_token": "x"})),
    )
    .await;
    assert_eq!(
        status, 404,
        "a user cannot replace another user's connection"
    );
    let (status, _) = call(
        &server,
        M::DELETE,
        &format!("/v1/users/user-9/connections/{connection_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_user_switches_a_workflow_on_with_their_own_connection_and_off() {
    let app = TestApp::new().await;
    let server = ServerHandle::start(&app.settings).await;
    use Method as M;
    let workflow_id = app_event_and_workflow(&server).await;
    let connection_id = user_connection(&server, "user-9", "http://127.0.0.1:9").await;
    let switch = format!("/v1/users/user-9/workflows/{workflow_id}");

    let (status, off) = call(&server, M::GET, "/v1/users/user-9/workflows", None).await;
    assert_eq!((status, off[0]["enabled"].clone()), (200, json!(false)));
    let (status, body) = call(
        &server,
        M::POST,
        &switch,
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
    let (status, _) = call(&server, M::POST, &switch, Some(json!({}))).await;
    assert_eq!(status, 400);
    let (status, _) = call(&server, M::DELETE, &switch, None).await;
    assert_eq!(status, 204);
    let (status, _) = call(&server, M::DELETE, &switch, None).await;
    assert_eq!(status, 404, "already off");
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_users_runs_are_listed_and_filtered() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    let server = ServerHandle::start(&app.settings).await;
    app.start_worker().await;
    use Method as M;
    let workflow_id = app_event_and_workflow(&server).await;
    let connection_id = user_connection(&server, "user-9", &crm.url()).await;
    let (status, _) = call(
        &server,
        M::POST,
        &format!("/v1/users/user-9/workflows/{workflow_id}"),
        Some(json!({"connection_id": connection_id})),
    )
    .await;
    assert_eq!(status, 200);

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
    server.stop().await;
    app.cleanup().await;
}

/// The status of a request made without an API key.
async fn without_key(server: &ServerHandle, method: Method, path: &str) -> u16 {
    let response = http_client()
        .request(method, format!("{}{path}", server.url))
        .send()
        .await
        .expect("request");
    response.status().as_u16()
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

/// An operation: its method and its path with every parameter written `{}`.
type Operation = (String, String);

/// The two ingest routes, documented in docs/publishing.md rather than in the tables of
/// docs/api.md.
const INGEST: [&str; 2] = ["/v1/events", "/v1/events/batch"];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn read_doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn openapi() -> Value {
    serde_json::from_str(&read_doc("openapi.json")).expect("docs/openapi.json is JSON")
}

/// `path` with every `{parameter}` replaced by `value`.
fn fill_parameters(path: &str, value: &str) -> String {
    let mut filled = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').expect("a parameter is closed") + start;
        filled.push_str(&rest[..start]);
        filled.push_str(value);
        rest = &rest[end + 1..];
    }
    filled.push_str(rest);
    filled
}

/// Follows a local `$ref` (`#/components/...`), or gives the object itself.
fn resolve<'a>(doc: &'a Value, item: &'a Value) -> &'a Value {
    match item["$ref"].as_str() {
        Some(reference) => doc
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("docs/openapi.json: {reference} is not defined")),
        None => item,
    }
}

/// What docs/openapi.json describes: each operation with the names of its query
/// parameters, its path as written, and the operation object.
fn openapi_operations(doc: &Value) -> BTreeMap<Operation, (BTreeSet<String>, String, Value)> {
    let paths = doc["paths"]
        .as_object()
        .expect("docs/openapi.json has paths");
    let mut operations = BTreeMap::new();
    for (path, item) in paths {
        for method in METHODS {
            let Some(operation) = item.get(method) else {
                continue;
            };
            let parameters = [&item["parameters"], &operation["parameters"]];
            let query: BTreeSet<String> = parameters
                .iter()
                .filter_map(|list| list.as_array())
                .flatten()
                .map(|parameter| resolve(doc, parameter))
                .filter(|parameter| parameter["in"] == "query")
                .filter_map(|parameter| parameter["name"].as_str().map(str::to_owned))
                .collect();
            let key = (method.to_uppercase(), fill_parameters(path, "{}"));
            operations.insert(key, (query, path.clone(), operation.clone()));
        }
    }
    operations
}

/// The routes of docs/api.md's tables (rows starting "| `METHOD /v1/..."), with the names
/// of the query parameters their `[?name=VALUE&...]` shows, and the ingest routes.
fn api_md_operations() -> BTreeMap<Operation, BTreeSet<String>> {
    let mut operations: BTreeMap<Operation, BTreeSet<String>> = INGEST
        .iter()
        .map(|path| (("POST".to_owned(), (*path).to_owned()), BTreeSet::new()))
        .collect();
    for line in read_doc("api.md").lines() {
        let Some(row) = line.trim_start().strip_prefix("| `") else {
            continue;
        };
        let Some((method, target)) = row.split_once('`').and_then(|(r, _)| r.split_once(' '))
        else {
            continue;
        };
        if !target.starts_with("/v1/") {
            continue;
        }
        let (path, query) = target.split_at(target.find(['[', '?']).unwrap_or(target.len()));
        let query: BTreeSet<String> = query
            .trim_matches(['[', '?', ']'])
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split('=').next().unwrap_or(pair).to_owned())
            .collect();
        let key = (method.to_owned(), fill_parameters(path, "{}"));
        assert!(
            operations.insert(key.clone(), query).is_none(),
            "docs/api.md lists {key:?} twice"
        );
    }
    operations
}

#[test]
fn the_openapi_document_lists_the_routes_of_the_api_docs() {
    let doc = openapi();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["info"]["version"],
        env!("CARGO_PKG_VERSION"),
        "docs/openapi.json describes this version"
    );
    let documented: BTreeMap<Operation, BTreeSet<String>> = openapi_operations(&doc)
        .into_iter()
        .map(|(key, (query, _, _))| (key, query))
        .collect();
    let listed = api_md_operations();
    let missing: Vec<_> = listed
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let extra: Vec<_> = documented
        .keys()
        .filter(|k| !listed.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "in docs/api.md but not docs/openapi.json: {missing:?}; \
         in docs/openapi.json but not docs/api.md: {extra:?}"
    );
    assert_eq!(
        documented, listed,
        "the query parameters of docs/openapi.json and docs/api.md differ"
    );
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_needs_a_key() {
    let app = TestApp::new().await;
    let server = ServerHandle::start(&app.settings).await;
    // A route the server does not have: the router's 404, without a JSON body.
    let (status, body) = call(&server, Method::GET, "/v1/not-a-route", None).await;
    assert_eq!((status, body), (404, Value::Null), "an unknown route");

    let doc = openapi();
    let operations = openapi_operations(&doc);
    assert!(operations.len() > 2, "docs/openapi.json lists the routes");
    // Every path parameter a UUID that names nothing: ids parse, nothing is found.
    let unknown = uuid::Uuid::nil().to_string();
    for ((method, _), (_, path, operation)) in &operations {
        let method = Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        let path = fill_parameters(path, &unknown);
        let body = operation.get("requestBody").map(|_| json!({}));
        let (status, answer) = call(&server, method.clone(), &path, body).await;
        assert_ne!(status, 405, "{method} {path}: no such method on the route");
        assert!(
            status != 404 || answer["error"].is_string(),
            "{method} {path}: 404 without a JSON error, so no route (got {answer})"
        );
        assert!(
            operation["responses"].get(status.to_string()).is_some(),
            "{method} {path}: answered {status}, which docs/openapi.json does not list: {answer}"
        );
        assert!(
            operation["responses"].get("401").is_some(),
            "{method} {path}: docs/openapi.json does not list 401"
        );
        let status = without_key(&server, method.clone(), &path).await;
        assert_eq!(status, 401, "{method} {path} without a key");
    }
    server.stop().await;
    app.cleanup().await;
}
