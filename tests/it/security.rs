//! Hardening: where the HTTP step may connect, TLS to Postgres, secrets at rest and in output.

use std::collections::BTreeMap;
use std::time::Duration;

use appevents::catalog::connections::{self as connection, NewConnection};
use appevents::core::provider::Provider;
use appevents::pipeline::runs::RunStatus;
use appevents::store::vault::Keyring;
use appevents_standin as standin;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{CONTACT_CREATED, TestApp, TlsProxy, appevents_command, eventually};

/// An HTTP-request workflow to `url` for user "u".
async fn http_workflow(app: &TestApp, url: &str) {
    app.app_event(CONTACT_CREATED).await;
    let workflow = app
        .workflow(
            "hook",
            CONTACT_CREATED,
            Provider::Http,
            "request",
            json!({"url": url}),
            json!({"email": "{{payload.email}}"}),
        )
        .await;
    let conn = app
        .connection("u", Provider::Http, "https://unused.example", "t")
        .await;
    app.subscribe("u", workflow.id, conn).await;
}

#[tokio::test]
async fn the_http_step_refuses_private_addresses_unless_allowed() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::with_settings(|s| s.http.allow = Vec::new()).await;
    http_workflow(&app, &format!("{}/hooks/x", crm.url())).await;
    app.start_worker().await;

    let id = app
        .publish(CONTACT_CREATED, "u", json!({"email": "a@b.c"}), None)
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Dead).await;
    let error = runs[0].last_error.clone().expect("error");
    assert_eq!(error["code"], "OUTBOUND_REFUSED");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("127.0.0.1 is a loopback address")),
        "{error}"
    );
    assert!(crm.standin.requests().is_empty(), "nothing was sent");
    app.cleanup().await;
}

#[tokio::test]
async fn redirects_are_followed_on_the_same_host_only() {
    let target = MockServer::start().await;
    let port = target.address().port();
    Mock::given(method("POST"))
        .and(path("/same"))
        .respond_with(
            ResponseTemplate::new(307)
                .insert_header("location", format!("http://127.0.0.1:{port}/final")),
        )
        .mount(&target)
        .await;
    Mock::given(method("POST"))
        .and(path("/final"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "ok"})))
        .expect(1)
        .mount(&target)
        .await;
    Mock::given(method("POST"))
        .and(path("/elsewhere"))
        .respond_with(
            ResponseTemplate::new(307)
                .insert_header("location", format!("http://localhost:{port}/final")),
        )
        .mount(&target)
        .await;
    let mut app =
        TestApp::with_settings(|s| s.http.allow = vec!["127.0.0.1".into(), "localhost".into()])
            .await;
    app.app_event(CONTACT_CREATED).await;
    for (name, url) in [("same", "/same"), ("elsewhere", "/elsewhere")] {
        let workflow = app
            .workflow(
                name,
                CONTACT_CREATED,
                Provider::Http,
                "request",
                json!({"url": format!("http://127.0.0.1:{port}{url}")}),
                json!({}),
            )
            .await;
        let conn = app
            .connection(
                &format!("user-{name}"),
                Provider::Http,
                "https://unused.example",
                "t",
            )
            .await;
        app.subscribe(&format!("user-{name}"), workflow.id, conn)
            .await;
    }
    app.start_worker().await;

    let same = app
        .publish(CONTACT_CREATED, "user-same", json!({}), None)
        .await;
    let followed = app.wait_for_runs(&same, 1, RunStatus::Succeeded).await;
    assert_eq!(followed[0].provider_id.as_deref(), Some("ok"));
    let elsewhere = app
        .publish(CONTACT_CREATED, "user-elsewhere", json!({}), None)
        .await;
    let refused = app.wait_for_runs(&elsewhere, 1, RunStatus::Dead).await;
    let message = refused[0]
        .last_error
        .as_ref()
        .and_then(|e| e["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    assert!(message.contains("redirect"), "{message}");
    app.cleanup().await;
}

#[tokio::test]
async fn response_bodies_are_read_up_to_the_cap() {
    let target = MockServer::start().await;
    let huge = "x".repeat(4 * 1024 * 1024);
    Mock::given(method("POST"))
        .and(path("/ok"))
        .respond_with(ResponseTemplate::new(201).set_body_string(huge.clone()))
        .mount(&target)
        .await;
    Mock::given(method("POST"))
        .and(path("/bad"))
        .respond_with(ResponseTemplate::new(400).set_body_string(huge))
        .mount(&target)
        .await;
    let mut app = TestApp::with_settings(|s| s.http.max_response_bytes = 4096).await;
    app.app_event(CONTACT_CREATED).await;
    for name in ["ok", "bad"] {
        let workflow = app
            .workflow(
                name,
                CONTACT_CREATED,
                Provider::Http,
                "request",
                json!({"url": format!("{}/{name}", target.uri())}),
                json!({}),
            )
            .await;
        let conn = app
            .connection(name, Provider::Http, "https://unused.example", "t")
            .await;
        app.subscribe(name, workflow.id, conn).await;
    }
    app.start_worker().await;

    let ok = app.publish(CONTACT_CREATED, "ok", json!({}), None).await;
    app.wait_for_runs(&ok, 1, RunStatus::Succeeded).await;
    let bad = app.publish(CONTACT_CREATED, "bad", json!({}), None).await;
    let runs = app.wait_for_runs(&bad, 1, RunStatus::Dead).await;
    let message = runs[0]
        .last_error
        .as_ref()
        .and_then(|e| e["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    assert!(
        message.chars().count() <= 501,
        "the error keeps an excerpt, not 4 MiB"
    );
    app.cleanup().await;
}

/// The local Postgres' TLS certificate (Debian's default), for the tests of TLS to Postgres.
const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

#[tokio::test]
async fn postgres_over_tls_verifies_the_server_certificate() {
    let app = TestApp::new().await;
    let db = appevents::store::db::pg_config(app.settings.database_url()).expect("url");
    let mut tls = app.settings.database.clone();
    tls.url = SecretString::from(format!(
        "postgres://postgres@localhost:5432/{}?sslmode=require",
        db.get_dbname().unwrap_or_default()
    ));
    assert!(
        std::path::Path::new(SNAKEOIL).exists(),
        "this test needs the local Postgres' TLS certificate at {SNAKEOIL} (Debian's default)"
    );
    tls.tls_ca_file = SNAKEOIL.into();
    let pool = appevents::store::db::pool(&tls).expect("pool");
    let client = pool.get().await.expect("TLS connection");
    let ssl: bool = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert!(ssl, "the session is encrypted");

    // The certificate is verified: it names localhost, so reaching the same server as
    // 127.0.0.1 is refused.
    tls.url = SecretString::from(format!(
        "postgres://postgres@127.0.0.1:5432/{}?sslmode=require",
        db.get_dbname().unwrap_or_default()
    ));
    let mismatched = appevents::store::db::pool(&tls).expect("pool");
    let err = mismatched
        .get()
        .await
        .expect_err("a certificate for another name is refused");
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_change_listener_reconnects_over_tls_without_reading_the_roots_again() {
    let mut app = TestApp::new().await;
    let db = appevents::store::db::pg_config(app.settings.database_url()).expect("url");
    // A copy of the server's CA, read when the worker starts and then deleted.
    let ca_file = std::env::temp_dir().join(format!("appevents-test-pg-ca-{}.pem", app.tag));
    std::fs::copy(SNAKEOIL, &ca_file).expect("copy the CA");
    app.settings.database.url = SecretString::from(format!(
        "postgres://postgres@localhost:5432/{}?sslmode=require",
        db.get_dbname().unwrap_or_default()
    ));
    app.settings.database.tls_ca_file = ca_file.to_string_lossy().into_owned();
    app.start_worker().await;
    let resolver = app.worker().context.resolver.clone();
    let listening = eventually(Duration::from_secs(10), || async { resolver.is_caching() }).await;
    assert!(listening, "the change listener is up, over TLS");
    let before = resolver.generation();

    std::fs::remove_file(&ca_file).expect("remove the CA");
    let client = app.pool.get().await.expect("client");
    let ended: i64 = client
        .query_one(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity \
             where datname = current_database() and query = 'listen appevents_config'",
            &[],
        )
        .await
        .expect("terminate the listener")
        .get(0);
    assert_eq!(ended, 1, "the listener's session was ended");

    let back = eventually(Duration::from_secs(10), || async {
        resolver.generation() > before && resolver.is_caching()
    })
    .await;
    assert!(back, "the listener came back with the roots it already had");
    app.cleanup().await;
}

#[tokio::test]
async fn amqp_over_tls_verifies_the_broker_certificate() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.url()).await;
    let tls = TlsProxy::start("127.0.0.1:5672").await;
    let amqps = |host: &str| format!("amqps://guest:guest@{host}:{}/%2f", tls.addr.port());
    let ca_file = tls.ca_file.to_string_lossy().into_owned();

    // The worker and the publisher both speak TLS to the broker, trusting the extra CA.
    app.settings.amqp.url = SecretString::from(amqps("localhost"));
    app.settings.amqp.tls_ca_file = ca_file.clone();
    app.start_worker().await;
    let id = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "tls@example.com"}),
            None,
        )
        .await;
    let runs = app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(crm.standin.records().len(), 1, "the event went through");
    assert!(
        tls.handshakes() >= 2,
        "worker and publisher connected through TLS ({} handshakes)",
        tls.handshakes()
    );

    // The certificate is verified: its name must match the host, and its issuer be trusted.
    let refused = [
        (
            amqps("127.0.0.1"),
            ca_file.as_str(),
            "a certificate for another name",
        ),
        (
            amqps("localhost"),
            "",
            "a certificate from an unknown issuer",
        ),
    ];
    for (url, ca, what) in refused {
        let err = appevents::transport::broker::connect(
            &url,
            ca,
            "tls test",
            appevents::transport::broker::Recovery::None,
        )
        .await
        .map(|_| ())
        .expect_err(what);
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "{what}: {err}"
        );
    }
    let missing = appevents::transport::broker::connect(
        &amqps("localhost"),
        "/nonexistent/ca.pem",
        "tls test",
        appevents::transport::broker::Recovery::None,
    )
    .await
    .map(|_| ())
    .expect_err("a CA file that cannot be read");
    assert!(
        missing.to_string().contains("amqp.tls_ca_file"),
        "{missing}"
    );
    app.stop_worker().await;
    app.cleanup().await;
}

#[tokio::test]
async fn secrets_stay_out_of_logs_debug_output_and_listings() {
    let crm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/crm/v3/objects/contacts"))
        .and(wiremock::matchers::header(
            "authorization",
            "Bearer sekrit-old-access",
        ))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            json!({"status": "error", "message": "expired", "category": "EXPIRED_AUTHENTICATION"}),
        ))
        .mount(&crm)
        .await;
    Mock::given(method("POST"))
        .and(path("/crm/v3/objects/contacts"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "1"})))
        .mount(&crm)
        .await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"access_token": "sekrit-new-access", "refresh_token": "sekrit-new-refresh"}),
        ))
        .mount(&crm)
        .await;
    let app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    let workflow = app
        .workflow(
            "hs",
            CONTACT_CREATED,
            Provider::Hubspot,
            "create-contact",
            json!({}),
            json!({"email": "{{payload.email}}"}),
        )
        .await;
    let conn = app
        .connection_with(NewConnection {
            user_id: "u".into(),
            provider: Provider::Hubspot,
            base_url: crm.uri(),
            settings: json!({}),
            access_token: Some(SecretString::from("sekrit-old-access")),
            refresh_token: Some(SecretString::from("sekrit-refresh")),
            token_url: Some(format!("{}/oauth/token", crm.uri())),
            client_id: Some("client".into()),
            client_secret: Some(SecretString::from("sekrit-client-secret")),
        })
        .await;
    app.subscribe("u", workflow.id, conn).await;

    let mut worker = appevents_command(&app.settings, &["worker"]);
    worker
        .env("RUST_LOG", "trace")
        .stderr(std::process::Stdio::piped());
    let mut worker = worker.spawn().expect("worker");
    // Read the logs as they come, or the worker blocks on a full pipe.
    let mut stderr = worker.stderr.take().expect("stderr");
    let logs = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut logs = String::new();
        let _ = stderr.read_to_string(&mut logs).await;
        logs
    });
    let id = app
        .publish(CONTACT_CREATED, "u", json!({"email": "a@b.c"}), None)
        .await;
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    crate::support::signal(&worker, "TERM");
    let _ = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("worker exits");
    let output = logs.await.expect("logs");
    assert!(
        output.contains("access token refreshed"),
        "the refresh happened and was logged"
    );
    for secret in [
        "sekrit-old-access",
        "sekrit-new-access",
        "sekrit-refresh",
        "sekrit-new-refresh",
        "sekrit-client-secret",
    ] {
        assert!(!output.contains(secret), "{secret} appeared in the logs");
    }

    let stored = connection::get(&app.pool, &app.keyring, conn)
        .await
        .expect("connection");
    let debug = format!("{stored:?}");
    assert!(!debug.contains("sekrit"), "Debug shows no secret: {debug}");
    let listed =
        serde_json::to_string(&connection::list(&app.pool, Some("u")).await.expect("list"))
            .expect("json");
    assert!(!listed.contains("sekrit"), "{listed}");
    let client = app.pool.get().await.expect("client");
    let row = client
        .query_one(
            "select access_token, refresh_token, client_secret from connections where id = $1",
            &[&conn],
        )
        .await
        .expect("row");
    for column in 0..3 {
        let sealed: Vec<u8> = row.get(column);
        assert!(
            !sealed.windows(6).any(|w| w == b"sekrit"),
            "column {column} stored in the clear"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn rotate_key_reencrypts_every_secret_and_the_old_key_can_go() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let old_key = "b2xkLWtleS1vbGQta2V5LW9sZC1rZXktb2xkLWtleSE=";
    let new_key = "bmV3LWtleS1uZXcta2V5LW5ldy1rZXktbmV3LWtleSE=";
    let mut app = TestApp::with_settings(|s| {
        s.secrets.keys = BTreeMap::from([("old".to_owned(), SecretString::from(old_key))]);
        s.secrets.active_key = "old".into();
    })
    .await;
    app.hubspot_workflow(&crm.url()).await;
    let client = app.pool.get().await.expect("client");
    let key_ids = || async {
        let rows = client
            .query("select access_token from connections", &[])
            .await
            .expect("rows");
        rows.iter()
            .map(|row| {
                Keyring::key_id_of(&row.get::<_, Vec<u8>>(0))
                    .expect("sealed")
                    .to_owned()
            })
            .collect::<Vec<String>>()
    };
    assert_eq!(key_ids().await, vec!["old"]);

    app.settings
        .secrets
        .keys
        .insert("new".into(), SecretString::from(new_key));
    app.settings.secrets.active_key = "new".into();
    let output = appevents_command(&app.settings, &["connection", "rotate-key"])
        .output()
        .await
        .expect("rotate");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains("re-encrypted 1 connection(s) under key new")
    );
    assert_eq!(key_ids().await, vec!["new"]);

    // Only the new key from now on: the worker still opens every secret.
    app.settings.secrets.keys.remove("old");
    app.start_worker().await;
    let id = app
        .publish(
            CONTACT_CREATED,
            "u",
            json!({"email": "rotated@example.com"}),
            None,
        )
        .await;
    app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    let token = connection::list(&app.pool, Some("u")).await.expect("list");
    assert_eq!(token.len(), 1);
    let keyring = Keyring::from_settings(&app.settings.secrets).expect("keyring");
    let opened = connection::get(&app.pool, &keyring, token[0].id)
        .await
        .expect("opens");
    assert_eq!(
        opened
            .access_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned())
            .as_deref(),
        Some("token")
    );
    app.cleanup().await;
}
