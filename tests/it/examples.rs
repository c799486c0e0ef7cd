//! The publishing examples run with the real client libraries (pika from PyPI, amqplib from
//! npm, and curl against `serve`) against a running worker: they prove the contract, not our
//! own encoder.

use std::path::{Path, PathBuf};

use appevents::run::RunStatus;
use appevents::standin;
use tokio::process::Command;

use crate::support::{CONTACT_CREATED, ServerHandle, TestApp};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A Python with pika: the system's when it has it, else a virtualenv made once under
/// target/ from examples/python/requirements.txt.
async fn python_with_pika() -> PathBuf {
    let system = Command::new("python3")
        .args(["-c", "import pika"])
        .status()
        .await;
    if system.is_ok_and(|s| s.success()) {
        return PathBuf::from("python3");
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("examples-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .await;
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 -m venv failed: install python3-venv"
        );
    }
    let installed = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "-r"])
        .arg(Path::new(REPO).join("examples/python/requirements.txt"))
        .status()
        .await;
    assert!(
        installed.is_ok_and(|s| s.success()),
        "pip install pika failed"
    );
    python
}

/// examples/node with its dependency (amqplib) installed.
async fn node_example() -> PathBuf {
    let dir = Path::new(REPO).join("examples/node");
    if !dir.join("node_modules/amqplib").exists() {
        let installed = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&dir)
            .status()
            .await;
        assert!(
            installed.is_ok_and(|s| s.success()),
            "npm install in examples/node failed"
        );
    }
    dir.join("publish.js")
}

async fn run_example(app: &TestApp, program: &Path, script: Option<&Path>, id: &str, email: &str) {
    let mut command = Command::new(program);
    if let Some(script) = script {
        command.arg(script);
    }
    let output = command
        .args(["--name", CONTACT_CREATED, "--user", "u", "--id", id])
        .args([
            "--payload",
            &format!(r#"{{"email": "{email}", "first_name": "Ada"}}"#),
        ])
        .env("AMQP_URL", app.settings.amqp_url())
        .env("APPEVENTS_EXCHANGE", &app.settings.amqp.exchange)
        .output()
        .await
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} failed: {}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), id, "the example prints the event id");
}

#[tokio::test]
async fn the_python_and_node_examples_publish_events_the_worker_processes() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.url()).await;
    app.start_worker().await;

    let python = python_with_pika().await;
    let script = Path::new(REPO).join("examples/python/publish.py");
    run_example(
        &app,
        &python,
        Some(&script),
        "evt-python",
        "pika@example.com",
    )
    .await;
    let node = node_example().await;
    run_example(
        &app,
        Path::new("node"),
        Some(&node),
        "evt-node",
        "amqplib@example.com",
    )
    .await;

    let server = ServerHandle::start(&app.settings).await;
    let curl = Command::new("bash")
        .arg(Path::new(REPO).join("examples/curl/publish.sh"))
        .args(["--name", CONTACT_CREATED, "--user", "u", "--id", "evt-curl"])
        .args(["--payload", r#"{"email": "curl@example.com"}"#])
        .env("APPEVENTS_URL", &server.url)
        .env("APPEVENTS_API_KEY", "test-key-2")
        .output()
        .await
        .expect("run the curl example");
    assert!(
        curl.status.success(),
        "curl example failed: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&curl.stdout).trim(), "evt-curl");

    app.wait_for_runs("evt-python", 1, RunStatus::Succeeded)
        .await;
    app.wait_for_runs("evt-node", 1, RunStatus::Succeeded).await;
    app.wait_for_runs("evt-curl", 1, RunStatus::Succeeded).await;
    server.stop().await;
    let emails: Vec<String> = crm
        .standin
        .records()
        .iter()
        .filter_map(|r| {
            r.fields
                .get("email")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect();
    assert!(
        emails.contains(&"pika@example.com".to_owned()),
        "{emails:?}"
    );
    assert!(
        emails.contains(&"amqplib@example.com".to_owned()),
        "{emails:?}"
    );
    assert!(
        emails.contains(&"curl@example.com".to_owned()),
        "{emails:?}"
    );
    app.cleanup().await;
}
