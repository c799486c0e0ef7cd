//! The Connect Portal in real headless Chromium, exactly as an end user goes through it:
//! open the portal with a user token, Connect HubSpot, approve at the (stand-in) HubSpot,
//! see "connected" back in the portal, switch a workflow on, and an event published for the
//! user becomes a contact in that user's HubSpot account, made with the token the flow
//! obtained. The screenshots docs/connect.md shows are taken on the way.

use std::time::Duration;

use fantoccini::Locator;
use serde_json::json;

use crate::support::portal::PortalServer;
use crate::support::{browser, eventually};

#[tokio::test]
async fn an_end_user_connects_hubspot_and_switches_a_workflow_on_in_a_real_browser() {
    let mut server = PortalServer::start().await;
    let (_, hubspot) = server.workflow_ids().await;
    server.app.start_worker().await;
    let browser = browser::session("portal").await;

    // 1. Open the portal with a user token: the token leaves the address at once.
    let entry = format!("{}/portal/ada?token={}", server.url, server.token("ada"));
    browser.goto(&entry).await.expect("open the portal");
    let url = browser.current_url().await.expect("url");
    assert_eq!(url.as_str(), format!("{}/portal/ada", server.url));
    assert_eq!(
        browser.text_of("#hubspot [data-status]").await,
        "Not connected"
    );
    browser.screenshots("portal-not-connected").await;

    // 2. Connect HubSpot: the provider opens in a new tab.
    let portal_tab = browser.window().await.expect("this tab");
    browser.click("#hubspot-connect").await;
    let opened = eventually(Duration::from_secs(10), || async {
        browser.windows().await.map(|w| w.len()).unwrap_or(0) == 2
    })
    .await;
    assert!(opened, "Connect opens HubSpot in a new tab");
    let windows = browser.windows().await.expect("tabs");
    let hubspot_tab = windows
        .into_iter()
        .find(|w| *w != portal_tab)
        .expect("the new tab");
    browser
        .switch_to_window(hubspot_tab)
        .await
        .expect("to HubSpot's tab");

    // 3. Approve at the stand-in HubSpot.
    browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#approve"))
        .await
        .expect("HubSpot's authorize page");
    let login = browser.find(Locator::Css("#login")).await.expect("login");
    login.clear().await.expect("clear");
    login
        .send_keys("ada@analytical.example")
        .await
        .expect("type");
    browser.screenshots("hubspot-authorize").await;
    browser.click("#approve").await;

    // 4. Back in the portal: connected.
    let status = browser.text_of("#hubspot [data-status]").await;
    assert!(
        status.starts_with("Connected as ada@analytical.example"),
        "{status}"
    );
    browser.close_window().await.expect("close HubSpot's tab");
    browser
        .switch_to_window(portal_tab)
        .await
        .expect("back to the portal");
    browser.refresh().await.expect("refresh");
    let status = browser.text_of("#hubspot [data-status]").await;
    assert!(
        status.starts_with("Connected as ada@analytical.example"),
        "{status}"
    );

    // 5. Switch the workflow on.
    let switch = format!("#workflow-{hubspot}");
    assert_eq!(browser.text_of(&format!("{switch} .label")).await, "Off");
    browser.click(&switch).await;
    let on = eventually(Duration::from_secs(10), || async {
        match browser.find(Locator::Css(&switch)).await {
            Ok(element) => element
                .attr("aria-checked")
                .await
                .ok()
                .flatten()
                .is_some_and(|v| v == "true"),
            Err(_) => false,
        }
    })
    .await;
    assert!(on, "the switch shows the workflow on");
    browser.screenshots("portal-connected").await;
    browser.close().await;

    // 6. Publish an event for the user; 7. the contact is in Ada's HubSpot, made with the
    // token the flow obtained (the stand-in records whose token made it).
    let (contact, hub) = server
        .publish_and_find_contact(
            "ada",
            json!({"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}),
        )
        .await;

    assert_eq!(contact.provider, "hubspot");
    assert_eq!(contact.account.as_deref(), Some(hub.as_str()));
    assert_eq!(contact.fields["firstname"], json!("Ada"));
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}
