//! The publishing examples run with the real client libraries (pika from PyPI, amqplib from
//! npm, and curl against `serve`) against a running worker: they prove the contract, not our
//! own encoder. The user-token examples (PyJWT, jsonwebtoken, golang-jwt) mint tokens the
//! Connect Portal must accept.

use std::path::{Path, PathBuf};

use appevents::pipeline::runs::RunStatus;
use appevents_standin as standin;
use tokio::process::Command;

use crate::support::portal::{self, PortalServer};
use crate::support::{CONTACT_CREATED, ServerHandle, TestApp, record_emails};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A Python that can import `module`: the system's when it can, else a virtualenv made once
/// under target/ with `requirements` installed. Tests run in parallel, so one at a time makes
/// or fills the virtualenv: another must not find it half made, without pip.
async fn python_with(module: &str, requirements: &str) -> PathBuf {
    static VENV: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = VENV.lock().await;
    let system = Command::new("python3")
        .args(["-c", &format!("import {module}")])
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
        .arg(Path::new(REPO).join(requirements))
        .status()
        .await;
    assert!(
        installed.is_ok_and(|s| s.success()),
        "pip install -r {requirements} failed"
    );
    python
}

/// A Node example directory with its dependencies installed (`npm install` once).
async fn node_example(dir: &str, dependency: &str, script: &str) -> PathBuf {
    let dir = Path::new(REPO).join(dir);
    if !dir.join("node_modules").join(dependency).exists() {
        let installed = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&dir)
            .status()
            .await;
        assert!(
            installed.is_ok_and(|s| s.success()),
            "npm install in {} failed",
            dir.display()
        );
    }
    dir.join(script)
}

/// Runs one example (`command`, to which the common arguments are added) and checks that it
/// printed the event id.
async fn run_example(app: &TestApp, mut command: Command, id: &str, email: &str) {
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
        "{id} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), id, "the example prints the event id");
}

/// Builds the Go program in `dir` in GOPATH mode against Debian's packaged libraries (nothing
/// from the module proxy); returns the binary, named `name`, under target/.
async fn go_build(dir: &str, gopath: &Path, name: &str, hint: &str) -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let binary = tmp.join(name);
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(Path::new(REPO).join(dir))
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        .env("GOCACHE", tmp.join("go-cache"))
        .status()
        .await;
    assert!(
        built.is_ok_and(|s| s.success()),
        "go build of {dir} failed: {hint}"
    );
    binary
}

/// A command running `program` with `args` first.
fn example(program: impl AsRef<std::ffi::OsStr>, args: &[&std::ffi::OsStr]) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    command
}

/// Waits for each event's run and checks the stand-in CRM holds a contact for each email.
async fn assert_processed(app: &TestApp, crm: &standin::Running, events: &[(&str, &str)]) {
    for (id, _) in events {
        app.wait_for_runs(id, 1, RunStatus::Succeeded).await;
    }
    let emails = record_emails(crm);
    for (_, email) in events {
        assert!(emails.iter().any(|e| e == email), "{email} in {emails:?}");
    }
}

#[tokio::test]
async fn the_python_and_node_examples_publish_events_the_worker_processes() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.url()).await;
    app.start_worker().await;

    let python = python_with("pika", "examples/python/requirements.txt").await;
    let script = Path::new(REPO).join("examples/python/publish.py");
    run_example(
        &app,
        example(&python, &[script.as_os_str()]),
        "evt-python",
        "pika@example.com",
    )
    .await;
    let node = node_example("examples/node", "amqplib", "publish.js").await;
    run_example(
        &app,
        example("node", &[node.as_os_str()]),
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

    server.stop().await;
    assert_processed(
        &app,
        &crm,
        &[
            ("evt-python", "pika@example.com"),
            ("evt-node", "amqplib@example.com"),
            ("evt-curl", "curl@example.com"),
        ],
    )
    .await;
    app.cleanup().await;
}

/// Go, Ruby and Java are not on every development machine: this test is run by `.ci/run`,
/// which installs them and their AMQP clients from Debian's packages (golang-go with
/// golang-github-rabbitmq-amqp091-go-dev, ruby-bunny, librabbitmq-client-java), with
/// `cargo test -- --ignored examples::`. Go builds in GOPATH mode against the packaged
/// client, so nothing is fetched from the Go module proxy.
#[tokio::test]
#[ignore = "needs Go, Ruby with bunny and Java with amqp-client; .ci/run installs them"]
async fn the_go_ruby_and_java_examples_publish_events_the_worker_processes() {
    let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
    let mut app = TestApp::new().await;
    app.hubspot_workflow(&crm.url()).await;
    app.start_worker().await;

    let go_binary = go_build(
        "examples/go",
        Path::new("/usr/share/gocode"),
        "examples-go-publish",
        "install golang-go and golang-github-rabbitmq-amqp091-go-dev",
    )
    .await;
    run_example(&app, example(&go_binary, &[]), "evt-go", "go@example.com").await;

    let ruby = Path::new(REPO).join("examples/ruby/publish.rb");
    run_example(
        &app,
        example("ruby", &[ruby.as_os_str()]),
        "evt-ruby",
        "bunny@example.com",
    )
    .await;

    let java = Path::new(REPO).join("examples/java/Publish.java");
    let classpath = "/usr/share/java/amqp-client.jar:/usr/share/java/slf4j-api.jar";
    run_example(
        &app,
        example(
            "java",
            &["-cp".as_ref(), classpath.as_ref(), java.as_os_str()],
        ),
        "evt-java",
        "java@example.com",
    )
    .await;

    assert_processed(
        &app,
        &crm,
        &[
            ("evt-go", "go@example.com"),
            ("evt-ruby", "bunny@example.com"),
            ("evt-java", "java@example.com"),
        ],
    )
    .await;
    app.cleanup().await;
}

/// Runs a user-token example for `user` with the portal's key; returns the token it printed.
async fn mint(server: &PortalServer, mut command: Command, user: &str) -> String {
    let output = command
        .arg(user)
        .env("APPEVENTS_USER_TOKEN_KEY", portal::TOKEN_KEY)
        .env("APPEVENTS_USER_TOKEN_KID", portal::TOKEN_KID)
        .env(
            "APPEVENTS_USER_TOKEN_AUDIENCE",
            &server.app.settings.user_tokens.audience,
        )
        .output()
        .await
        .expect("run the example");
    assert!(
        output.status.success(),
        "the example failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The token opens the user's portal: the server accepts it.
async fn assert_opens_the_portal(server: &PortalServer, user: &str, token: &str) {
    let page = server.visitor().enter(user, token).await;
    assert_eq!(page.status, 200, "{}", page.body);
}

#[tokio::test]
async fn the_python_and_node_user_token_examples_mint_tokens_the_portal_accepts() {
    let server = PortalServer::start().await;

    let python = python_with("jwt", "examples/user-tokens/python/requirements.txt").await;
    let script = Path::new(REPO).join("examples/user-tokens/python/mint.py");
    let token = mint(&server, example(&python, &[script.as_os_str()]), "py-user").await;
    assert_opens_the_portal(&server, "py-user", &token).await;

    let node = node_example("examples/user-tokens/node", "jsonwebtoken", "mint.js").await;
    let token = mint(&server, example("node", &[node.as_os_str()]), "node-user").await;
    assert_opens_the_portal(&server, "node-user", &token).await;
    server.stop().await;
}

/// Go is not on every development machine: `.ci/run` installs it with golang-jwt from
/// Debian's packages (golang-github-golang-jwt-jwt-dev, v4) and runs this. The example
/// imports the module path `github.com/golang-jwt/jwt/v4`; GOPATH mode finds it through a
/// link in a GOPATH made here, so nothing is fetched from the Go module proxy.
#[tokio::test]
#[ignore = "needs Go and golang-jwt; .ci/run installs them"]
async fn the_go_user_token_example_mints_tokens_the_portal_accepts() {
    let server = PortalServer::start().await;
    let gopath = Path::new(env!("CARGO_TARGET_TMPDIR")).join("user-token-gopath");
    let link = gopath.join("src/github.com/golang-jwt/jwt/v4");
    if !link.exists() {
        std::fs::create_dir_all(link.parent().expect("parent")).expect("GOPATH");
        std::os::unix::fs::symlink("/usr/share/gocode/src/github.com/golang-jwt/jwt", &link)
            .expect("link golang-jwt");
    }
    let binary = go_build(
        "examples/user-tokens/go",
        &gopath,
        "examples-go-mint",
        "install golang-go and golang-github-golang-jwt-jwt-dev",
    )
    .await;

    let token = mint(&server, example(&binary, &[]), "go-user").await;

    assert_opens_the_portal(&server, "go-user", &token).await;
    server.stop().await;
}
