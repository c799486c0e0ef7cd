//! The Connect Portal over HTTP, as a browser without JavaScript uses it: the OAuth flows
//! against the stand-in's Salesforce and HubSpot, reconnecting, disconnecting, switching
//! workflows, and every bad input the issue lists — each answered with a clear page,
//! nothing stored, and no secret in the server's logs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use appevents::catalog::connections;
use appevents::core::authorization::State;
use appevents::core::connection::ConnectionStatus;
use appevents::core::provider::Provider;
use appevents::pipeline::runs::RunStatus;
use appevents_standin::oauth::OAuthSettings;
use reqwest::Url;
use serde_json::json;
use uuid::Uuid;

use crate::support::CONTACT_CREATED;
use crate::support::portal::{
    CLIENT_SECRET, OTHER_REDIRECT, PortalServer, TOKEN_KEY, TOKEN_KID, Visitor,
};

/// `Contact Created` with one workflow per provider; returns (salesforce, hubspot) ids.
async fn workflows(server: &PortalServer) -> (Uuid, Uuid) {
    let app = &server.app;
    app.app_event(CONTACT_CREATED).await;
    let salesforce = app
        .workflow(
            "Contact to Salesforce",
            CONTACT_CREATED,
            Provider::Salesforce,
            "create",
            json!({}),
            json!({"Email": "{{payload.email}}", "LastName": "{{payload.last_name}}"}),
        )
        .await;
    let hubspot = app
        .workflow(
            "Contact to HubSpot",
            CONTACT_CREATED,
            Provider::Hubspot,
            "create-contact",
            json!({}),
            json!({"email": "{{payload.email}}"}),
        )
        .await;
    (salesforce.id, hubspot.id)
}

/// The OAuth state in an authorize URL.
fn state_of(authorize_url: &str) -> String {
    Url::parse(authorize_url)
        .expect("URL")
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("a state")
}

fn query_param(url: &str, name: &str) -> Option<String> {
    Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A visitor with a portal session for `user`.
async fn signed_in(server: &PortalServer, user: &str) -> Visitor {
    let mut visitor = server.visitor();
    let page = visitor.enter(user, &server.token(user)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    visitor
}

#[tokio::test]
async fn hubspot_connects_a_workflow_switches_on_and_an_event_lands_in_that_account() {
    let mut server = PortalServer::start().await;
    let (_, hubspot) = workflows(&server).await;
    server.app.start_worker().await;
    let mut ada = signed_in(&server, "ada").await;

    let back = ada.connect_and_approve("ada", "hubspot", "ada@analytical.example").await;
    assert_eq!(back.status, 303, "{}", back.body);
    let page = ada.get("/portal/ada").await;
    assert!(
        page.body.contains("Connected as ada@analytical.example (analytical.example, hub "),
        "{}",
        page.body
    );
    let switched = ada
        .post(
            &format!("/portal/ada/workflows/{hubspot}"),
            &[("csrf", &page.csrf()), ("on", "true")],
        )
        .await;
    assert_eq!(switched.status, 303, "{}", switched.body);
    let event = server
        .app
        .publish(CONTACT_CREATED, "ada", json!({"email": "ada@example.com"}), None)
        .await;
    server.app.wait_for_runs(&event, 1, RunStatus::Succeeded).await;

    let stored = server.connections("ada").await;
    assert_eq!(stored.len(), 1);
    let hub = stored[0].settings["account_id"].as_str().expect("hub id").to_owned();
    assert_eq!(stored[0].base_url, server.crm.url());
    assert!(stored[0].has_refresh_token && stored[0].token_url.is_some());
    let records = server.crm.standin.records();
    let contact = records
        .iter()
        .find(|r| r.fields.get("email") == Some(&json!("ada@example.com")))
        .expect("the contact");
    assert_eq!(contact.account.as_deref(), Some(hub.as_str()), "made with the flow's token");
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}
