//! HTTP ingest: `POST /v1/events` and `/v1/events/batch`.

use std::time::Duration;

use appevents::pipeline::runs::RunStatus;
use appevents_standin as standin;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::support::{CONTACT_CREATED, Proxy, ServerHandle, TestApp, eventually, http_client};

#[tokio::test]
async fn an_event_posted_over_http_is_answered_201_and_processed() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.url()).await;
    app.start_worker().await;
    let server = ServerHandle::start(&app.settings).await;

    let response = server
        .post("/v1/events")
        .json(&json!({"name": CONTACT_CREATED, "user_id": "u", "payload": {"email": "http@example.com"}, "id": "evt-http-1"}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, json!({"id": "evt-http-1"}));
    app.wait_for_runs("evt-http-1", 1, RunStatus::Succeeded)
        .await;

    // Without an id, one is assigned and returned; the second key works too (rotation).
    let response = http_client()
        .post(format!("{}/v1/events", server.url))
        .bearer_auth("test-key-2")
        .json(&json!({"name": CONTACT_CREATED, "user_id": "u", "payload": {"email": "second@example.com"}}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;

    // Unmatched events are accepted all the same, like Paragon's 201.
    let response = server
        .post("/v1/events")
        .json(&json!({"name": "Nobody Listens", "user_id": "nobody", "payload": {}}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let app = TestApp::with_settings(|s| s.server.max_body_bytes = 2048).await;
    let server = ServerHandle::start(&app.settings).await;
    let error_of = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("json error body");
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    };

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "no key",
            http_client()
                .post(format!("{}/v1/events", server.url))
                .json(&json!({})),
            401,
            "API key",
        ),
        (
            "wrong key",
            http_client()
                .post(format!("{}/v1/events", server.url))
                .bearer_auth("nope")
                .json(&json!({})),
            401,
            "API key",
        ),
        (
            "not json",
            server
                .post("/v1/events")
                .header("content-type", "application/json")
                .body("{oops"),
            400,
            "not JSON",
        ),
        (
            "missing name",
            server
                .post("/v1/events")
                .json(&json!({"user_id": "u", "payload": {}})),
            400,
            "field `name` is missing",
        ),
        (
            "payload array",
            server
                .post("/v1/events")
                .json(&json!({"name": "n", "user_id": "u", "payload": []})),
            400,
            "field `payload` must be an object",
        ),
        (
            "empty user",
            server
                .post("/v1/events")
                .json(&json!({"name": "n", "user_id": "", "payload": {}})),
            400,
            "field `user_id` is empty",
        ),
        (
            "wrong content type",
            server
                .post("/v1/events")
                .header("content-type", "text/plain")
                .body(r#"{"name":"n","user_id":"u","payload":{}}"#),
            400,
            "not application/json",
        ),
        (
            "too large",
            server
                .post("/v1/events")
                .json(&json!({"name": "n", "user_id": "u", "payload": {"x": "y".repeat(4096)}})),
            413,
            "too large",
        ),
    ];
    for (case, request, status, message) in cases {
        let (got, error) = error_of(request.send().await.expect("send")).await;
        assert_eq!(got, status, "{case}: {error}");
        assert!(
            error.contains(message),
            "{case}: {error:?} lacks {message:?}"
        );
    }
    let unauthorized = http_client()
        .post(format!("{}/v1/events", server.url))
        .send()
        .await
        .expect("send");
    assert_eq!(
        unauthorized
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn no_201_without_the_broker_503_instead_then_201_when_it_is_back() {
    let mut app = TestApp::new().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let mut settings = app.settings.clone();
    settings.amqp.url = SecretString::from(format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        proxy.addr.port()
    ));
    let server = ServerHandle::start(&settings).await;
    let event =
        |id: &str| json!({"name": CONTACT_CREATED, "user_id": "u", "payload": {}, "id": id});

    let first = server
        .post("/v1/events")
        .json(&event("evt-before"))
        .send()
        .await
        .expect("post");
    assert_eq!(first.status(), 201);

    proxy.cut();
    let refused = server
        .post("/v1/events")
        .json(&event("evt-during"))
        .send()
        .await
        .expect("post");
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.expect("json");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("broker")),
        "{body}"
    );
    let not_ready = http_client()
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(not_ready.status(), 503);

    proxy.restore();
    let accepted = eventually(Duration::from_secs(15), || async {
        server
            .post("/v1/events")
            .json(&event("evt-after"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 201)
    })
    .await;
    assert!(accepted, "201 again once the broker is back");
    // Exactly what was answered 201 is in the queue.
    let queued: Vec<String> = app
        .take_all(&app.settings.amqp.queue)
        .await
        .iter()
        .map(|m| {
            serde_json::from_slice::<Value>(&m.body).expect("json")["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert!(
        queued.contains(&"evt-before".to_owned()) && queued.contains(&"evt-after".to_owned()),
        "{queued:?}"
    );
    assert!(!queued.contains(&"evt-during".to_owned()), "{queued:?}");
    app.stop_worker().await;
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn while_the_broker_is_down_requests_are_refused_at_once_even_during_a_slow_connect() {
    // A broker that accepts connections and never answers: every connect takes the full
    // 5-second timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let app = TestApp::new().await;
    let mut settings = app.settings.clone();
    settings.amqp.url = SecretString::from(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    let server = ServerHandle::start(&settings).await;
    let post = || {
        server
            .post("/v1/events")
            .json(&json!({"name": CONTACT_CREATED, "user_id": "u", "payload": {}}))
            .send()
    };

    // The first request waits for the first connect, and learns it failed.
    let first = post().await.expect("post");
    assert_eq!(first.status(), 503);

    // From then on the broker is known to be down: reconnects go on in the background, and
    // no request waits behind one.
    for _ in 0..15 {
        let started = std::time::Instant::now();
        let response = post().await.expect("post");
        let took = started.elapsed();
        assert_eq!(response.status(), 503);
        assert!(took < Duration::from_millis(500), "answered after {took:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_batch_reports_each_event_on_its_own() {
    let app = TestApp::with_settings(|s| s.server.max_batch = 5).await;
    let server = ServerHandle::start(&app.settings).await;

    let good =
        |id: &str| json!({"name": CONTACT_CREATED, "user_id": "u", "payload": {"n": 1}, "id": id});
    let response = server
        .post("/v1/events/batch")
        .json(&json!({"events": [good("b-1"), {"name": CONTACT_CREATED, "payload": {}}, good("b-2"), {"name": "x", "user_id": "u", "payload": "no"}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 207);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["rejected"], 2);
    assert_eq!(
        body["results"][0],
        json!({"index": 0, "status": 201, "id": "b-1"})
    );
    assert_eq!(body["results"][1]["status"], 400);
    assert!(
        body["results"][1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("user_id"))
    );
    assert_eq!(body["results"][2]["id"], "b-2");
    assert!(
        body["results"][3]["error"]
            .as_str()
            .is_some_and(|e| e.contains("payload"))
    );

    let all_good = server
        .post("/v1/events/batch")
        .json(&json!({"events": [good("b-3"), good("b-4")]}))
        .send()
        .await
        .expect("post");
    assert_eq!(all_good.status(), 201);

    let too_many = server
        .post("/v1/events/batch")
        .json(&json!({"events": (0..6).map(|n| good(&format!("m-{n}"))).collect::<Vec<_>>()}))
        .send()
        .await
        .expect("post");
    assert_eq!(too_many.status(), 413);
    let not_a_batch = server
        .post("/v1/events/batch")
        .json(&json!([good("x")]))
        .send()
        .await
        .expect("post");
    assert_eq!(not_a_batch.status(), 400);

    let queued = app.queue_depth(&app.settings.amqp.queue).await;
    assert_eq!(queued, 4, "the accepted events, and only them");
    server.stop().await;
    app.cleanup().await;
}
