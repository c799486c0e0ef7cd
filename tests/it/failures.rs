//! What a newcomer meets when something around appevents is wrong: each case is one line on
//! stderr that names the cause, and exit status 1. Run as a user runs the binary (no
//! RUST_LOG), against names no one else uses; nothing is created on the shared broker or
//! database.

use appevents::config::Settings;
use uuid::Uuid;

use crate::support::{amqp_url, appevents_command, test_settings};

/// Runs the binary with `settings`, the environment changed by `env`; returns (status,
/// stderr).
async fn fails(settings: &Settings, env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut command = appevents_command(settings, args);
    command.env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), command.output())
        .await
        .expect("the command ends")
        .expect("run appevents");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_one_line(case: &str, (code, stderr): (i32, String), expected: &[&str]) {
    assert_eq!(code, 1, "{case}: exit status 1: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{case}: one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{case}: {stderr}");
    for part in expected {
        assert!(stderr.contains(part), "{case}: names {part:?}: {stderr}");
    }
}

fn tag() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The AMQP URL of the test broker with another user, password or virtual host.
fn amqp_url_with(user_password: Option<&str>, vhost: Option<&str>) -> String {
    let mut url = reqwest::Url::parse(&amqp_url()).expect("amqp url");
    if let Some((user, password)) = user_password.and_then(|up| up.split_once(':')) {
        url.set_username(user).expect("user");
        url.set_password(Some(password)).expect("password");
    }
    if let Some(vhost) = vhost {
        url.set_path(&format!("/{vhost}"));
    }
    url.to_string()
}

const PUBLISH: &[&str] = &[
    "publish",
    "--name",
    "Contact Created",
    "--user",
    "u",
    "--payload",
    "{}",
];

#[tokio::test]
async fn a_missing_database_is_one_line_with_the_remedy() {
    let tag = tag();
    // The test settings name a database of this tag, which nothing created.
    let settings = test_settings(&tag);
    let result = fails(&settings, &[], &["workflow", "list"]).await;
    assert_one_line(
        "missing database",
        result,
        &[
            &format!("database \"appevents_test_{tag}\" does not exist"),
            "appevents migrate",
        ],
    );
}

#[tokio::test]
async fn a_missing_virtual_host_is_one_line() {
    let tag = tag();
    let vhost = format!("appevents-missing-{tag}");
    let settings = test_settings(&tag);
    let url = amqp_url_with(None, Some(&vhost));
    let result = fails(&settings, &[("AMQP_URL", &url)], PUBLISH).await;
    assert_one_line(
        "missing vhost",
        result,
        &[
            &format!("virtual host \"{vhost}\" does not exist"),
            "cannot connect to the broker at amqp://",
        ],
    );
}

#[tokio::test]
async fn a_wrong_password_is_one_line_without_the_password() {
    let tag = tag();
    let settings = test_settings(&tag);
    let password = format!("wrong-{tag}");
    let url = amqp_url_with(Some(&format!("guest:{password}")), None);
    let (code, stderr) = fails(&settings, &[("AMQP_URL", &url)], PUBLISH).await;
    assert!(!stderr.contains(&password), "{stderr}");
    assert_one_line(
        "wrong password",
        (code, stderr),
        &["login refused: wrong user name or password"],
    );
}

#[tokio::test]
async fn a_closed_port_is_one_line_with_the_address() {
    let tag = tag();
    let settings = test_settings(&tag);
    // A port that was free a moment ago: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let result = fails(&settings, &[("AMQP_URL", &url)], PUBLISH).await;
    assert_one_line(
        "closed port",
        result,
        &[&format!("127.0.0.1:{port}"), "Connection refused"],
    );
}

#[tokio::test]
async fn an_ops_port_in_use_names_the_address_and_the_setting() {
    let tag = tag();
    let settings = test_settings(&tag);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("addr").to_string();
    let result = fails(
        &settings,
        &[("APPEVENTS__WORKER__OPS_LISTEN", &address)],
        &["worker"],
    )
    .await;
    assert_one_line(
        "port in use",
        result,
        &[&address, "worker.ops_listen", "Address already in use"],
    );
    drop(taken);
}

#[tokio::test]
async fn publish_declares_nothing_and_says_what_does() {
    let tag = tag();
    let settings = test_settings(&tag);

    // No exchange: a mistyped vhost or exchange name fails, naming the remedy.
    let result = fails(&settings, &[], PUBLISH).await;
    assert_one_line(
        "no exchange",
        result,
        &[
            &format!("no exchange '{}'", settings.amqp.exchange),
            "appevents migrate",
        ],
    );

    // The exchange without the worker's queue: unroutable, and still no queue made.
    let (connection, channel) = crate::support::broker_channel().await;
    channel
        .exchange_declare(
            settings.amqp.exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("exchange");
    let result = fails(&settings, &[], PUBLISH).await;
    let queue_exists = connection
        .create_channel()
        .await
        .expect("channel")
        .queue_declare(
            settings.amqp.queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = channel
        .exchange_delete(
            settings.amqp.exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, "test done".into()).await;
    assert_one_line(
        "no queue bound",
        result,
        &["no work queue is bound", "appevents migrate"],
    );
    assert!(!queue_exists, "publish declared no queue");
}

#[tokio::test]
async fn a_worker_says_which_vhost_is_missing_and_writes_no_colour_codes_to_a_pipe() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let app = crate::support::TestApp::new().await;
    let vhost = format!("appevents-missing-{}", app.tag);
    let url = amqp_url_with(None, Some(&vhost));
    let mut worker = appevents_command(&app.settings, &["worker"])
        .env("AMQP_URL", &url)
        .env("APPEVENTS__LOG__FORMAT", "pretty")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("worker binary");
    let mut lines = BufReader::new(worker.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let said = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let done = line.contains(&format!("virtual host \"{vhost}\" does not exist"));
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    crate::support::signal(&worker, "TERM");
    let _ = worker.wait().await;
    let log = seen.join("\n");
    assert!(said, "the worker names the missing vhost: {log}");
    assert!(!log.contains('\u{1b}'), "no colour codes in a pipe: {log}");
    assert!(
        !log.contains("lapin"),
        "lapin's own lines are silenced: {log}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_missing_key_names_the_configuration_layers_read() {
    let tag = tag();
    let settings = test_settings(&tag);
    let directory = std::env::temp_dir().join(format!("appevents-nokey-{tag}"));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let mut command = appevents_command(
        &settings,
        &[
            "connection",
            "create",
            "--user",
            "u",
            "--provider",
            "http",
            "--base-url",
            "http://127.0.0.1:1",
        ],
    );
    command
        .current_dir(&directory)
        .env("APPEVENTS_ENVIRONMENT", "production")
        .env_remove("APPEVENTS__SECRETS__ACTIVE_KEY")
        .env_remove("APPEVENTS__SECRETS__KEYS__TEST");
    let output = command.output().await.expect("run appevents");
    std::fs::remove_dir_all(&directory).ok();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_one_line(
        "no key",
        (output.status.code().unwrap_or(-1), stderr),
        &[
            "no encryption key configured",
            "configuration read: the built-in defaults, no ",
            "config/production.toml found",
        ],
    );
}
