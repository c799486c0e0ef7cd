//! The operator console over HTTP, as a browser without JavaScript reaches it: access
//! (login, the session cookie, CSRF, CSP, redirects), the run history's filters and keyset
//! pages, a dead run's retry with its audit entry, and hostile or bad input. The browser
//! scenario is in `console_browser`.

use std::time::Duration;

use appevents::catalog::workflows::{self, NewWorkflow};
use appevents::core::provider::Provider;
use appevents::pipeline::runs::RunStatus;
use appevents::transport::dead_letter::ReasonCode;
use serde_json::json;

use crate::support::console::{ConsoleApp, OPERATOR, OPERATOR_KEY};
use crate::support::{CONTACT_CREATED, eventually};

#[tokio::test]
async fn without_a_session_every_page_redirects_to_login_and_a_post_does_nothing() {
    let console = ConsoleApp::start().await;
    console
        .dead_letter(
            "evt-1",
            json!({"email": "a@example.com"}),
            ReasonCode::Permanent,
            "permanent error: nope",
        )
        .await;
    let mut client = console.client();

    for path in [
        "/console",
        "/console/runs?status=dead",
        "/console/dead-letters",
        "/console/catalog",
        "/console/audit",
    ] {
        let page = client.get(path).await;
        assert_eq!(page.status, 303, "{path}");
        let location = page.location().expect("a redirect");
        assert!(
            location.starts_with("/console/login?next="),
            "{path}: {location}"
        );
    }
    let purge = client
        .post(
            "/console/dead-letters/purge",
            &[("csrf", "guess"), ("expected", "1")],
        )
        .await;

    assert_eq!(purge.status, 303);
    assert_eq!(purge.location(), Some("/console/login?next=%2Fconsole"));
    assert_eq!(console.app.dead_letter_ids().await, ["evt-1"]);
    assert!(console.audit().await.is_empty());
    console.stop().await;
}

#[tokio::test]
async fn an_operator_key_opens_a_strict_httponly_session_and_a_wrong_key_does_not() {
    let console = ConsoleApp::start().await;
    let mut client = console.client();

    let login = client.get("/console/login?next=%2Fconsole%2Fruns").await;
    assert_eq!(login.status, 200);
    let wrong = client
        .post(
            "/console/login",
            &[
                ("key", "not-an-operator-key-but-just-as-long"),
                ("csrf", &login.csrf()),
            ],
        )
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(wrong.body.contains("not an operator key"), "{}", wrong.body);
    let forged = client
        .post(
            "/console/login",
            &[("key", OPERATOR_KEY), ("csrf", "forged")],
        )
        .await;
    assert_eq!(forged.status, 403, "a login without its form's token");
    let form = client.get("/console/login?next=%2Fconsole%2Fruns").await;
    let done = client
        .post(
            "/console/login",
            &[
                ("key", OPERATOR_KEY),
                ("csrf", &form.csrf()),
                ("next", "/console/runs"),
            ],
        )
        .await;

    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(done.location(), Some("/console/runs"));
    let session = done
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("appevents_console="))
        .expect("the session cookie");
    assert!(session.contains("HttpOnly"), "{session}");
    assert!(session.contains("SameSite=Strict"), "{session}");
    assert!(session.contains("Path=/console"), "{session}");
    let runs = client.get("/console/runs").await;
    assert_eq!(runs.status, 200, "{}", runs.body);
    assert!(runs.body.contains(OPERATOR));
    let csp = runs.header("content-security-policy");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let htmx = reqwest::get(format!("{}/assets/htmx.min.js", console.url()))
        .await
        .expect("htmx");
    assert_eq!(htmx.status(), 200);

    // Logging out ends the session on the server, not only in this browser.
    let stale = client.cookies.clone();
    let out = client
        .post("/console/logout", &[("csrf", &runs.csrf())])
        .await;
    assert_eq!(out.status, 303);
    client.cookies = stale;
    assert_eq!(client.get("/console/runs").await.status, 303);
    console.stop().await;
}

#[tokio::test]
async fn a_post_without_the_session_s_csrf_token_is_refused_and_moves_nothing() {
    let console = ConsoleApp::start().await;
    console
        .dead_letter(
            "evt-1",
            json!({"email": "a@example.com"}),
            ReasonCode::Permanent,
            "permanent error: nope",
        )
        .await;
    let dead = console.runs("u", 1, Some("nope")).await;
    let mut client = console.operator().await;

    let purge = client
        .post("/console/dead-letters/purge", &[("expected", "1")])
        .await;
    let forged = client
        .post(
            "/console/dead-letters/replay",
            &[("csrf", "forged"), ("expected", "1")],
        )
        .await;
    let retry = client
        .post(&format!("/console/runs/{}/retry", dead[0]), &[])
        .await;

    for page in [&purge, &forged, &retry] {
        assert_eq!(page.status, 403, "{}", page.body);
        assert!(page.body.contains("This form has expired"), "{}", page.body);
    }
    assert_eq!(console.app.dead_letter_ids().await, ["evt-1"]);
    assert!(console.audit().await.is_empty());
    console.stop().await;
}

#[tokio::test]
async fn runs_are_listed_newest_first_a_keyset_page_at_a_time() {
    let console = ConsoleApp::start().await;
    let made = console.runs("pager", 120, None).await;
    console.runs("someone-else", 5, None).await;
    let mut client = console.operator().await;

    let mut seen = Vec::new();
    let mut next = Some("/console/runs?user=pager".to_owned());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let page = client.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(!page.body.contains("OFFSET"));
        seen.extend(run_ids(&page.body));
        next = older_link(&page.body);
        pages += 1;
    }

    assert_eq!(pages, 3, "50 + 50 + 20");
    assert_eq!(seen.len(), 120);
    // `runs` made them newest first: the list shows them in that order, each once.
    let made: Vec<String> = made.iter().map(ToString::to_string).collect();
    assert_eq!(seen, made);
    console.stop().await;
}

fn run_ids(body: &str) -> Vec<String> {
    body.split("data-run=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect()
}

fn older_link(body: &str) -> Option<String> {
    let start = body.find("<a href=\"/console/runs?")?;
    let link = &body[start..];
    if !link[..link.find("</a>")?].contains("id=\"older\"") {
        return older_link(&body[start + 10..]);
    }
    let href = link.strip_prefix("<a href=\"")?;
    Some(
        href[..href.find('"')?]
            .replace("&#38;", "&")
            .replace("&amp;", "&"),
    )
}

#[tokio::test]
async fn unknown_filter_values_get_a_message_on_the_page_not_a_500() {
    let console = ConsoleApp::start().await;
    let mut client = console.operator().await;

    for (path, message) in [
        ("/console/runs?status=sleeping", "unknown run status"),
        ("/console/runs?workflow=not-a-uuid", "is not a workflow id"),
        (
            "/console/runs?since=last+tuesday",
            "neither an RFC 3339 time nor a duration",
        ),
        ("/console/runs?before=123_abc", "is not a page of this list"),
        ("/console/dead-letters?older_than=soon", "is not a duration"),
        ("/console/dead-letters?workflow=42", "is not a workflow id"),
    ] {
        let page = client.get(path).await;
        assert_eq!(page.status, 400, "{path}: {}", page.body);
        assert!(page.body.contains(message), "{path}: {}", page.body);
        assert!(page.body.contains("id=\"filter-error\""), "{path}");
    }
    let unknown_run = client.get("/console/runs/not-a-run").await;
    assert_eq!(unknown_run.status, 404);
    let no_run = client
        .get(&format!("/console/runs/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(no_run.status, 404);
    let no_action = client.get("/console/dead-letters/explode").await;
    assert_eq!(no_action.status, 404);
    console.stop().await;
}

#[tokio::test]
async fn html_in_payloads_and_errors_is_escaped_and_huge_payloads_are_cut_with_a_link() {
    let console = ConsoleApp::start().await;
    let script = "<script>alert('owned')</script>";
    let huge = "x".repeat(20_000);
    console
        .dead_letter(
            "evt-script",
            json!({"email": script, "notes": huge}),
            ReasonCode::Permanent,
            &format!("permanent error: {script}"),
        )
        .await;
    let dead = console.runs("u", 1, Some(script)).await;
    let mut client = console.operator().await;

    let letters = client.get("/console/dead-letters").await;
    let runs = client.get("/console/runs?status=dead").await;
    let run = client.get(&format!("/console/runs/{}", dead[0])).await;

    for page in [&letters, &runs, &run] {
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(!page.body.contains("<script>alert"), "{}", page.body);
        // askama writes `<` and `>` as numeric references.
        assert!(page.body.contains("&#60;script&#62;alert"), "{}", page.body);
    }
    assert!(
        letters.body.len() < 20_000,
        "the payload is cut: {} bytes",
        letters.body.len()
    );
    assert!(letters.body.contains("the whole message as JSON"));
    let raw = client
        .get("/console/dead-letters/raw?event_id=evt-script&user=u")
        .await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("content-type"), "application/json");
    let body: serde_json::Value = serde_json::from_str(&raw.body).expect("JSON");
    assert_eq!(
        body["payload"]["notes"].as_str().map(str::len),
        Some(20_000)
    );
    console.stop().await;
}

#[tokio::test]
async fn retrying_a_dead_run_moves_its_letter_back_and_is_audited() {
    let console = ConsoleApp::start().await;
    let dead = console.runs("u", 1, Some("upstream said no")).await;
    let event_id = "evt-u-1";
    console
        .dead_letter(
            event_id,
            json!({"email": "a@example.com"}),
            ReasonCode::Permanent,
            "permanent error: upstream said no",
        )
        .await;
    console
        .dead_letter(
            "evt-other",
            json!({"email": "b@example.com"}),
            ReasonCode::Permanent,
            "permanent error: other",
        )
        .await;
    let mut client = console.operator().await;
    let page = client.get(&format!("/console/runs/{}", dead[0])).await;
    assert!(
        page.body.contains("id=\"retry\""),
        "a dead run has a retry button"
    );

    let retried = client
        .post(
            &format!("/console/runs/{}/retry", dead[0]),
            &[("csrf", &page.csrf())],
        )
        .await;

    assert_eq!(retried.status, 303, "{}", retried.body);
    assert_eq!(console.app.dead_letter_ids().await, ["evt-other"]);
    assert_eq!(
        console
            .app
            .queue_depth(&console.app.settings.amqp.queue)
            .await,
        1
    );
    let audit = console.audit().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].0, OPERATOR);
    assert_eq!(audit[0].1, "retry");
    assert_eq!(audit[0].2, format!("run {}", dead[0]));
    assert_eq!(audit[0].3.as_deref(), Some("replayed its dead letter"));
    let log = client.get("/console/audit").await;
    assert!(
        log.body.contains(&format!("run {}", dead[0])),
        "{}",
        log.body
    );

    // The letter is gone now: a second retry says so, and is audited as failed.
    let again = client
        .post(
            &format!("/console/runs/{}/retry", dead[0]),
            &[("csrf", &page.csrf())],
        )
        .await;
    assert_eq!(again.status, 409);
    assert!(
        again.body.contains("has no dead letter to replay"),
        "{}",
        again.body
    );
    let finished = eventually(Duration::from_secs(5), || async {
        console
            .audit()
            .await
            .last()
            .and_then(|e| e.3.clone())
            .is_some_and(|o| o.starts_with("failed"))
    })
    .await;
    assert!(finished);
    console.stop().await;
}

#[tokio::test]
async fn the_overview_and_catalog_show_what_needs_attention_and_never_a_secret() {
    let mut console = ConsoleApp::start().await;
    let secret = "sekrit-access-token-of-grace";
    let revoked = console
        .app
        .connection(
            "grace",
            appevents::core::provider::Provider::Hubspot,
            &console.crm.url(),
            secret,
        )
        .await;
    let client_db = console.app.pool.get().await.expect("db");
    client_db
        .execute(
            "update connections set status = 'needs_reauth', status_reason = 'invalid_grant' where id = $1",
            &[&revoked],
        )
        .await
        .expect("revoke");
    console.runs("u", 3, None).await;
    console.runs("u2", 2, Some("nope")).await;
    console
        .dead_letter(
            "evt-x",
            json!({"email": "x@example.com"}),
            ReasonCode::Exhausted,
            "retries exhausted: x",
        )
        .await;
    console.app.start_worker().await;
    // The worker's first heartbeat is written beside its consumer's start, not before it.
    let beating = eventually(Duration::from_secs(10), || async {
        client_db
            .query_opt("select 1 from workers where alive_until > now()", &[])
            .await
            .is_ok_and(|row| row.is_some())
    })
    .await;
    assert!(beating, "a worker's heartbeat");
    let worker: uuid::Uuid = client_db
        .query_one("select id from workers where alive_until > now()", &[])
        .await
        .expect("a worker's heartbeat")
        .get(0);
    let mut client = console.operator().await;

    let overview = client.get("/console").await;
    let catalog = client.get("/console/catalog").await;
    let test = client
        .get(&format!(
            "/console/catalog/workflows/{}/test?user=u",
            console.workflow
        ))
        .await;

    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(
        overview
            .body
            .contains("aria-label=\"Events per minute, last hour\"")
    );
    assert!(
        overview.body.contains("hubspot · succeeded</text>"),
        "{}",
        overview.body
    );
    assert!(overview.body.contains("hubspot · dead</text>"));
    assert!(
        overview.body.contains("exhausted</a> <strong>1</strong>"),
        "{}",
        overview.body
    );
    assert!(
        overview.body.contains(&worker.to_string()),
        "the live worker is listed"
    );
    assert!(
        overview.body.contains("invalid_grant"),
        "the revoked connection is listed"
    );
    assert_eq!(catalog.status, 200);
    assert!(catalog.body.contains("Contact Created"));
    assert!(
        catalog.body.contains("{{payload.email}}"),
        "the mapping is shown"
    );
    assert!(catalog.body.contains("needs_reauth: invalid_grant"));
    assert_eq!(test.status, 200, "{}", test.body);
    assert!(test.body.contains("id=\"dry-run\""), "{}", test.body);
    assert!(
        test.body.contains("/crm/v3/objects/contacts"),
        "{}",
        test.body
    );
    for page in [&overview, &catalog, &test] {
        assert!(!page.body.contains(secret));
        assert!(
            !page.body.contains("Bearer token"),
            "the user's token is masked"
        );
    }
    console.stop().await;
}

#[tokio::test]
async fn a_run_of_several_steps_shows_each_step_with_its_request_and_output() {
    let mut console = ConsoleApp::start().await;
    let workflow = workflows::create(
        &console.app.pool,
        &NewWorkflow {
            name: "account then contact".into(),
            event: CONTACT_CREATED.into(),
            provider: Provider::Salesforce,
            action: String::new(),
            options: json!({}),
            mapping: json!({}),
            when: None,
            steps: crate::steps::steps(json!([
                {"name": "account", "action": "create", "options": {"sobject": "Account"},
                 "mapping": {"Name": "{{payload.company}}"}},
                {"name": "contact", "action": "create",
                 "mapping": {"LastName": "{{payload.last_name}}", "AccountId": "{{steps.account.id}}"}}
            ])),
        },
    )
    .await
    .expect("workflow");
    let connection = console
        .app
        .connection(
            "steps-user",
            Provider::Salesforce,
            &console.crm.url(),
            "secret-token",
        )
        .await;
    console
        .app
        .subscribe("steps-user", workflow.id, connection)
        .await;
    console.app.start_worker().await;

    console
        .app
        .publish(
            CONTACT_CREATED,
            "steps-user",
            json!({"company": "Acme", "last_name": "Chain"}),
            Some("evt-steps"),
        )
        .await;
    let runs = console
        .app
        .wait_for_runs("evt-steps", 1, RunStatus::Succeeded)
        .await;
    let records = console.crm.standin.records();
    let account = records
        .iter()
        .find(|r| r.object == "Account")
        .expect("an account");
    let contact = records
        .iter()
        .find(|r| r.object == "Contact")
        .expect("a contact");

    let mut client = console.operator().await;
    let page = client.get(&format!("/console/runs/{}", runs[0].id)).await;

    assert_eq!(page.status, 200, "{}", page.body);
    let account_at = page.body.find("1. account").expect("step 1 named");
    let contact_at = page.body.find("2. contact").expect("step 2 named");
    assert!(account_at < contact_at, "in order");
    assert!(
        page.body.contains("/sobjects/Account"),
        "step 1's request: {}",
        page.body
    );
    assert!(
        page.body.contains(&account.id),
        "step 1's output names its id"
    );
    assert!(
        page.body.contains(&contact.id),
        "step 2's output names its id"
    );
    assert!(
        !page.body.contains("secret-token"),
        "never a credential: {}",
        page.body
    );
    console.app.cleanup().await;
}
