//! The operator console in real headless Chromium, as an operator goes through it after an
//! outage: log in, find a dead letter by its reason, preview and replay it, see its run
//! succeed, purge another after confirming, and the two refusals: a POST without the
//! session's CSRF token, a page without a session. The screenshots docs/console.md shows are
//! taken on the way.

use std::time::Duration;

use appevents::transport::dead_letter::ReasonCode;
use fantoccini::Locator;
use serde_json::json;

use crate::support::console::{ConsoleApp, OPERATOR, OPERATOR_KEY};
use crate::support::{browser, eventually};

#[tokio::test]
async fn an_operator_replays_and_purges_dead_letters_in_a_real_browser() {
    let mut console = ConsoleApp::start().await;
    // The run the outage killed, and its dead letter; another letter, a duplicate.
    let dead = console.runs("u", 1, Some("scripted outage")).await;
    console
        .dead_letter(
            "evt-u-1",
            json!({"email": "ada@example.com", "first_name": "Ada"}),
            ReasonCode::Exhausted,
            "retries exhausted: transient 503: scripted outage",
        )
        .await;
    console
        .dead_letter(
            "evt-duplicate",
            json!({"email": "grace@example.com", "first_name": "Grace"}),
            ReasonCode::Permanent,
            "permanent error: permanent 400 DUPLICATES_DETECTED: Use one of these records?",
        )
        .await;
    console.app.start_worker().await;
    let browser = browser::session("console").await;
    let url = console.url().to_owned();

    // 1. Log in: a page without a session goes to the login page first.
    browser
        .goto(&format!("{url}/console/runs"))
        .await
        .expect("open");
    assert!(
        browser
            .current_url()
            .await
            .expect("url")
            .path()
            .ends_with("/console/login")
    );
    browser.screenshots("console-login").await;
    browser
        .element("#key")
        .await
        .send_keys(OPERATOR_KEY)
        .await
        .expect("type");
    browser.click("#login").await;
    assert_eq!(browser.text_of("#operator").await, OPERATOR);
    assert_eq!(
        browser.current_url().await.expect("url").path(),
        "/console/runs"
    );

    // 2. Find the dead letter by its reason.
    browser
        .goto(&format!("{url}/console/dead-letters"))
        .await
        .expect("open");
    browser
        .element("#reason")
        .await
        .send_keys("scripted outage")
        .await
        .expect("type");
    browser.click("#filter").await;
    let summary = browser.text_of("#summary").await;
    assert!(
        summary.starts_with("1 of 2 dead letters match"),
        "{summary}"
    );
    browser.screenshots("console-dead-letters").await;

    // 3. Preview the replay (nothing moves), then confirm it.
    browser.click(".replay-one").await;
    let preview = browser.text_of("#preview-count").await;
    assert!(
        preview.starts_with("1 of 2 dead letters would be moved"),
        "{preview}"
    );
    assert_eq!(
        console.app.dead_letter_ids().await.len(),
        2,
        "a preview moves nothing"
    );
    browser.screenshots("console-replay-preview").await;
    browser.click("#confirm").await;
    let replayed = finished_job(&browser).await;
    assert!(
        replayed.contains("replayed 1 of 2 scanned"),
        "the job page reports the replay done (htmx polls it): {replayed}"
    );
    browser.screenshots("console-replay-done").await;

    // 4. Its run succeeds: the worker ran the replayed letter.
    let run_page = format!("{url}/console/runs/{}", dead[0]);
    let succeeded = eventually(Duration::from_secs(20), || async {
        browser.goto(&run_page).await.is_ok() && browser.text_of("#run-status").await == "succeeded"
    })
    .await;
    assert!(succeeded, "the replayed run succeeded");
    assert!(
        console
            .crm
            .standin
            .records()
            .iter()
            .any(|r| r.fields["email"] == json!("ada@example.com"))
    );
    browser.screenshots("console-run").await;
    browser
        .goto(&format!("{url}/console/runs"))
        .await
        .expect("runs");
    browser.screenshots("console-runs").await;

    // 5. Purge the other, after confirming.
    browser
        .goto(&format!("{url}/console/dead-letters?reason=DUPLICATES"))
        .await
        .expect("open");
    browser.click("#purge-all").await;
    assert!(
        browser
            .text_of("#preview-count")
            .await
            .contains("deleted for good")
    );
    browser.click("#confirm").await;
    let purged = finished_job(&browser).await;
    assert!(purged.contains("purged 1"), "{purged}");
    assert!(console.app.dead_letter_ids().await.is_empty());
    browser
        .goto(&format!("{url}/console/audit"))
        .await
        .expect("audit");
    let audit = browser.text_of("#audit").await;
    assert!(
        audit.contains("replay") && audit.contains("purge"),
        "{audit}"
    );
    browser.screenshots("console-audit").await;
    browser
        .goto(&format!("{url}/console"))
        .await
        .expect("overview");
    browser.element("#workers li").await;
    browser.screenshots("console-overview").await;
    browser
        .goto(&format!("{url}/console/catalog"))
        .await
        .expect("catalog");
    browser.screenshots("console-catalog").await;

    // 6. A POST without the CSRF token is refused.
    browser
        .execute(
            "const form = document.createElement('form'); form.method = 'post'; \
             form.action = '/console/dead-letters/purge'; document.body.appendChild(form); \
             form.submit();",
            vec![],
        )
        .await
        .expect("post a form");
    let refused = eventually(Duration::from_secs(10), || async {
        match browser.find(Locator::Css("h1")).await {
            Ok(h1) => h1.text().await.is_ok_and(|t| t == "This form has expired"),
            Err(_) => false,
        }
    })
    .await;
    assert!(refused, "a POST without the CSRF token is refused");

    // 7. Without a session, a page redirects to the login page.
    browser
        .delete_all_cookies()
        .await
        .expect("forget the session");
    browser
        .goto(&format!("{url}/console/dead-letters"))
        .await
        .expect("open");
    let at = browser.current_url().await.expect("url");
    assert_eq!(at.path(), "/console/login");
    assert_eq!(at.query(), Some("next=%2Fconsole%2Fdead%2Dletters"));
    browser.close().await;
    console.stop().await;
}

/// The job page's status once it is no longer running: its text. Read in one script, as
/// htmx may swap the element between two WebDriver calls.
async fn finished_job(browser: &browser::Session) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = browser
            .execute(
                "const s = document.querySelector('#job-status'); \
                 return s ? [s.dataset.state, s.textContent] : null;",
                vec![],
            )
            .await
            .ok()
            .and_then(|v| serde_json::from_value::<(String, String)>(v).ok());
        if let Some((state, text)) = status
            && state != "running"
        {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job did not finish within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
