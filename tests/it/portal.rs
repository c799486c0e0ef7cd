//! The Connect Portal over HTTP, as a browser without JavaScript uses it: the OAuth flows
//! against the stand-in's Salesforce and HubSpot, reconnecting, disconnecting, switching
//! workflows, and every bad input the issue lists — each answered with a clear page,
//! nothing stored, and no secret in the server's logs.

use std::time::{SystemTime, UNIX_EPOCH};

use appevents::catalog::connections;
use appevents::core::authorization::State;
use appevents::core::connection::ConnectionStatus;
use appevents::core::provider::Provider;
use appevents_standin::oauth::OAuthSettings;
use reqwest::Url;
use serde_json::json;

use crate::support::portal::{
    CLIENT_SECRET, OTHER_REDIRECT, PortalServer, TOKEN_KEY, TOKEN_KID, Visitor,
};

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

/// The portal with its two workflows, and a browser session for Ada.
async fn ada_signed_in(
    adjust: impl FnOnce(&mut appevents::config::Settings),
) -> (PortalServer, Visitor) {
    let server = PortalServer::start_with(adjust).await;
    server.workflow_ids().await;
    let ada = signed_in(&server, "ada").await;
    (server, ada)
}

/// The callback as a provider's redirect would call it.
fn callback_url(provider: &str, code: &str, state: &str) -> String {
    let query = Url::parse_with_params("http://callback/", &[("code", code), ("state", state)])
        .expect("URL");
    format!(
        "/portal/oauth/{provider}/callback?{}",
        query.query().unwrap_or_default()
    )
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
    let (_, hubspot) = server.workflow_ids().await;
    server.app.start_worker().await;
    let mut ada = signed_in(&server, "ada").await;

    let back = ada
        .connect_and_approve("ada", "hubspot", "ada@analytical.example")
        .await;
    assert_eq!(back.status, 303, "{}", back.body);
    let page = ada.get("/portal/ada").await;
    assert!(
        page.body
            .contains("Connected as ada@analytical.example (analytical.example, hub "),
        "{}",
        page.body
    );
    let switched = ada.switch_on("ada", hubspot).await;
    assert_eq!(switched.status, 303, "{}", switched.body);
    let (contact, hub) = server
        .publish_and_find_contact("ada", json!({"email": "ada@example.com"}))
        .await;

    let stored = server.connections("ada").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].base_url, server.crm.url());
    assert!(stored[0].has_refresh_token && stored[0].token_url.is_some());
    assert_eq!(
        contact.account.as_deref(),
        Some(hub.as_str()),
        "made with the flow's token"
    );
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

#[tokio::test]
async fn salesforce_connects_with_pkce_and_its_instance_url_becomes_the_base_url() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;

    let authorize = ada.connect("ada", "salesforce").await;
    assert_eq!(
        query_param(&authorize, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert_eq!(
        query_param(&authorize, "code_challenge").map(|c| c.len()),
        Some(43)
    );
    let approved = ada.decide(&authorize, "approve", "ada@sf.example").await;
    let back = ada.get(&approved.location.expect("callback")).await;

    assert_eq!(back.status, 303, "{}", back.body);
    let stored = server.connections("ada").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].provider, Provider::Salesforce);
    assert_eq!(
        stored[0].base_url,
        server.crm.url(),
        "the token answer's instance_url"
    );
    assert_eq!(stored[0].settings["account"], json!("ada@sf.example"));
    assert!(
        stored[0].settings["account_id"]
            .as_str()
            .expect("org")
            .starts_with("00D")
    );
    let page = ada.get("/portal/ada").await;
    assert!(
        page.body.contains("Connected as ada@sf.example"),
        "{}",
        page.body
    );
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

#[tokio::test]
async fn hubspot_with_pkce_turned_on_sends_the_verifier_the_stand_in_checks() {
    let server = PortalServer::start_with(|s| s.oauth.hubspot.app.pkce = true).await;
    server.workflow_ids().await;
    let mut ada = signed_in(&server, "ada").await;

    let authorize = ada.connect("ada", "hubspot").await;
    assert!(query_param(&authorize, "code_challenge").is_some());
    let approved = ada.decide(&authorize, "approve", "ada@hs.example").await;
    let back = ada.get(&approved.location.expect("callback")).await;

    assert_eq!(back.status, 303, "{}", back.body);
    assert_eq!(server.connections("ada").await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn reconnecting_a_connection_that_needs_reauth_replaces_it_in_place_and_keeps_its_workflows()
{
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let hubspot = server.workflow_of(Provider::Hubspot).await;
    ada.connect_and_approve("ada", "hubspot", "ada@hs.example")
        .await;
    let first = server.connections("ada").await.remove(0);
    ada.switch_on("ada", hubspot).await;
    let (_, version) = connections::get_versioned(&server.app.pool, &server.app.keyring, first.id)
        .await
        .expect("connection");
    connections::mark_needs_reauth(
        &server.app.pool,
        first.id,
        &version,
        "refresh token refused",
    )
    .await
    .expect("marked");
    let page = ada.get("/portal/ada").await;
    assert!(
        page.body.contains("data-status=\"needs-reauth\""),
        "{}",
        page.body
    );
    assert!(page.body.contains(">Reconnect</button>"), "{}", page.body);

    let back = ada
        .connect_and_approve("ada", "hubspot", "ada@hs.example")
        .await;

    assert_eq!(back.status, 303, "{}", back.body);
    let after = server.connections("ada").await;
    assert_eq!(after.len(), 1, "replaced, not added");
    assert_eq!(after[0].id, first.id, "in place");
    assert_eq!(after[0].status, ConnectionStatus::Active);
    let before_token = version;
    let (_, now_version) =
        connections::get_versioned(&server.app.pool, &server.app.keyring, first.id)
            .await
            .expect("connection");
    assert_ne!(now_version, before_token, "new credentials");
    let subscriptions =
        appevents::catalog::subscriptions::list(&server.app.pool, Some("ada"), Some(hubspot))
            .await
            .expect("subscriptions");
    assert_eq!(subscriptions.len(), 1);
    assert_eq!(
        subscriptions[0].connection_id, first.id,
        "the workflow stays on, bound to it"
    );
    server.stop().await;
}

#[tokio::test]
async fn disconnect_revokes_at_the_provider_then_deletes_the_connection_and_its_workflows() {
    let server = PortalServer::start().await;
    let (salesforce, hubspot) = server.workflow_ids().await;
    let mut ada = signed_in(&server, "ada").await;
    ada.connect_and_approve("ada", "hubspot", "ada@hs.example")
        .await;
    ada.connect_and_approve("ada", "salesforce", "ada@sf.example")
        .await;
    let page = ada.get("/portal/ada").await;
    for workflow in [salesforce, hubspot] {
        ada.switch_on("ada", workflow).await;
    }
    let stored = server.connections("ada").await;
    let mut secrets = Vec::new();
    for summary in &stored {
        let opened = connections::get(&server.app.pool, &server.app.keyring, summary.id)
            .await
            .expect("connection");
        secrets.push(opened);
    }

    for connection in &stored {
        let done = ada
            .post(
                &format!("/portal/ada/connections/{}/disconnect", connection.id),
                &[("csrf", &page.csrf())],
            )
            .await;
        assert_eq!(done.status, 303, "{}", done.body);
    }

    assert!(server.connections("ada").await.is_empty());
    assert_eq!(server.count("subscriptions").await, 0);
    // The provider no longer honours the grant: neither refresh token refreshes.
    for connection in secrets {
        use secrecy::ExposeSecret;
        let refreshed = crate::support::http_client()
            .post(connection.token_url.clone().expect("token URL"))
            .form(&[
                ("grant_type", "refresh_token"),
                (
                    "refresh_token",
                    connection
                        .refresh_token
                        .as_ref()
                        .expect("refresh")
                        .expose_secret(),
                ),
                (
                    "client_id",
                    connection.client_id.as_deref().expect("client id"),
                ),
                ("client_secret", CLIENT_SECRET),
            ])
            .send()
            .await
            .expect("token endpoint");
        assert_eq!(
            refreshed.status(),
            400,
            "{} still refreshes",
            connection.provider
        );
    }
    let page = ada.get("/portal/ada").await;
    assert_eq!(
        page.body.matches("data-status=\"not-connected\"").count(),
        2
    );
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

#[tokio::test]
async fn a_revoke_that_fails_keeps_the_connection_says_why_and_can_be_retried() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let hubspot = server.workflow_of(Provider::Hubspot).await;
    ada.connect_and_approve("ada", "hubspot", "ada@hs.example")
        .await;
    let page = ada.get("/portal/ada").await;
    ada.switch_on("ada", hubspot).await;
    let connection = server.connections("ada").await.remove(0);
    server.crm.standin.set_oauth(OAuthSettings {
        fail_revoke: Some(503),
        ..oauth_clients(&server)
    });
    let disconnect = format!("/portal/ada/connections/{}/disconnect", connection.id);

    let failed = ada.post(&disconnect, &[("csrf", &page.csrf())]).await;

    assert_eq!(failed.status, 502);
    assert!(
        failed
            .body
            .contains("could not revoke the tokens, so the connection is kept"),
        "{}",
        failed.body
    );
    assert!(
        failed.body.contains("id=\"hubspot-disconnect\""),
        "the retry is offered"
    );
    assert_eq!(server.connections("ada").await.len(), 1);
    assert_eq!(server.count("subscriptions").await, 1);

    server.crm.standin.set_oauth(oauth_clients(&server));
    let retried = ada.post(&disconnect, &[("csrf", &page.csrf())]).await;

    assert_eq!(retried.status, 303, "{}", retried.body);
    assert!(server.connections("ada").await.is_empty());
    assert_eq!(server.count("subscriptions").await, 0);
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

/// The stand-in's settings as the harness made them (the clients), to change one fault.
fn oauth_clients(server: &PortalServer) -> OAuthSettings {
    OAuthSettings {
        clients: crate::support::portal::clients(&server.app.settings),
        ..OAuthSettings::default()
    }
}

// ---- Bad input: each answered clearly, nothing stored, no secret logged. ----

#[tokio::test]
async fn a_forged_state_is_refused_and_nothing_is_stored() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let (authorize, callback) = ada.approved("ada", "hubspot", "ada@hs.example").await;
    let code = query_param(&callback, "code").expect("code");
    let state = state_of(&authorize);
    // Another nonce under the same signature, and a state signed with another key.
    let (head, mac) = state.rsplit_once('.').expect("signed");
    let mut parts: Vec<&str> = head.split('.').collect();
    parts[1] = "another-nonce";
    let altered = format!("{}.{mac}", parts.join("."));
    let foreign = State {
        provider: Provider::Hubspot,
        nonce: "n".into(),
        user: "ada".into(),
        expires_at: now() + 60,
    }
    .sign(&secrecy::SecretBox::new(Box::new([7u8; 32])));

    for forged in [altered.as_str(), foreign.as_str(), "junk", ""] {
        let answer = ada.get(&callback_url("hubspot", &code, forged)).await;
        assert_eq!(answer.status, 400, "{forged}: {}", answer.body);
        assert!(
            answer.body.contains("cannot be trusted"),
            "{forged}: {}",
            answer.body
        );
    }
    let no_state = ada
        .get(&format!("/portal/oauth/hubspot/callback?code={code}"))
        .await;
    assert_eq!(no_state.status, 400);

    assert!(server.connections("ada").await.is_empty());
    // The real authorization is still pending, and still works.
    let genuine = ada.get(&callback).await;
    assert_eq!(genuine.status, 303, "{}", genuine.body);
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

#[tokio::test]
async fn an_expired_state_is_refused_and_nothing_is_stored() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let (authorize, callback) = ada.approved("ada", "hubspot", "ada@hs.example").await;
    let code = query_param(&callback, "code").expect("code");
    // The same authorization, signed by the server's own key, but past its expiry.
    let key = server.app.keyring.derive("appevents/oauth-state/v1");
    let state = State::verify(&state_of(&authorize), Provider::Hubspot, &key, now())
        .expect("the server's state");
    let expired = State {
        expires_at: now() - 1,
        ..state
    }
    .sign(&key);

    let answer = ada.get(&callback_url("hubspot", &code, &expired)).await;

    assert_eq!(answer.status, 400);
    assert!(answer.body.contains("has expired"), "{}", answer.body);
    assert!(server.connections("ada").await.is_empty());
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

#[tokio::test]
async fn a_reused_state_is_refused_and_the_connection_is_not_touched() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let (_, callback) = ada.approved("ada", "hubspot", "ada@hs.example").await;
    assert_eq!(ada.get(&callback).await.status, 303);
    let connected = server.connections("ada").await;

    let replay = ada.get(&callback).await;

    assert_eq!(replay.status, 400);
    assert!(replay.body.contains("was used already"), "{}", replay.body);
    let after = server.connections("ada").await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].id, connected[0].id);
    assert_eq!(after[0].token_refreshed_at, connected[0].token_refreshed_at);
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

#[tokio::test]
async fn access_denied_at_salesforce_is_a_clear_page_and_stores_nothing() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let authorize = ada.connect("ada", "salesforce").await;

    let denied = ada.decide(&authorize, "deny", "ada@sf.example").await;
    let back = denied.location.expect("Salesforce redirects a denial back");
    assert_eq!(
        query_param(&back, "error").as_deref(),
        Some("access_denied")
    );
    let answer = ada.get(&back).await;

    assert_eq!(answer.status, 400);
    assert!(answer.body.contains("Not connected"), "{}", answer.body);
    assert!(
        answer
            .body
            .contains("access was not granted at salesforce: end-user denied authorization"),
        "{}",
        answer.body
    );
    assert!(server.connections("ada").await.is_empty());
    assert_eq!(
        server.count("oauth_authorizations").await,
        0,
        "the authorization is over"
    );
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

#[tokio::test]
async fn a_hubspot_denial_stays_at_hubspot_or_comes_back_as_access_denied() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;

    // HubSpot documents no redirect when the user declines.
    let authorize = ada.connect("ada", "hubspot").await;
    let denied = ada.decide(&authorize, "deny", "ada@hs.example").await;
    assert_eq!(denied.status, 200);
    assert!(denied.location.is_none());
    assert!(denied.body.contains("Access was not granted"));
    // An authorization server that does redirect (RFC 6749) is handled too.
    server.crm.standin.set_oauth(OAuthSettings {
        hubspot_deny_redirects: true,
        ..oauth_clients(&server)
    });
    let authorize = ada.connect("ada", "hubspot").await;
    let denied = ada.decide(&authorize, "deny", "ada@hs.example").await;
    let answer = ada.get(&denied.location.expect("redirected")).await;

    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("access was not granted at hubspot"),
        "{}",
        answer.body
    );
    assert!(server.connections("ada").await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_code_used_twice_is_refused_by_the_provider_and_stores_nothing_new() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let (_, callback) = ada.approved("ada", "hubspot", "ada@hs.example").await;
    let code = query_param(&callback, "code").expect("code");
    assert_eq!(ada.get(&callback).await.status, 303);
    let connected = server.connections("ada").await;
    // A fresh authorization, answered with the first one's code.
    let second = ada.connect("ada", "hubspot").await;

    let answer = ada
        .get(&callback_url("hubspot", &code, &state_of(&second)))
        .await;

    assert_eq!(answer.status, 502);
    assert!(
        answer
            .body
            .contains("hubspot refused the authorization code")
            && answer.body.contains("missing or unknown auth code"),
        "{}",
        answer.body
    );
    let after = server.connections("ada").await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].id, connected[0].id);
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

#[tokio::test]
async fn a_redirect_uri_that_does_not_match_is_refused_at_both_ends() {
    // The app's registered callback is not the one the server is configured with: the
    // provider's page says so and sends the browser nowhere.
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let authorize = ada.connect("ada", "salesforce").await;
    let mut wrong = Url::parse(&authorize).expect("URL");
    let pairs: Vec<(String, String)> = wrong
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "redirect_uri" {
                "http://attacker.test/cb".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    wrong.query_pairs_mut().clear().extend_pairs(pairs);
    let page = ada.get(wrong.as_str()).await;
    assert_eq!(page.status, 400);
    assert!(page.body.contains("redirect_uri_mismatch"), "{}", page.body);
    assert!(page.location.is_none());

    // A code issued for another registered callback: the exchange with the server's own
    // redirect URI is refused, and the page says so.
    let mut other = Url::parse(&authorize).expect("URL");
    let pairs: Vec<(String, String)> = other
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "redirect_uri" {
                OTHER_REDIRECT.into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    other.query_pairs_mut().clear().extend_pairs(pairs);
    let approved = ada
        .decide(other.as_str(), "approve", "ada@sf.example")
        .await;
    let elsewhere = approved.location.expect("a redirect to the other callback");
    assert!(elsewhere.starts_with(OTHER_REDIRECT));
    let answer = ada
        .get(&format!(
            "/portal/oauth/salesforce/callback?{}",
            Url::parse(&elsewhere).expect("URL").query().expect("query")
        ))
        .await;

    assert_eq!(answer.status, 502);
    assert!(
        answer.body.contains("redirect_uri_mismatch"),
        "{}",
        answer.body
    );
    assert!(server.connections("ada").await.is_empty());
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

#[tokio::test]
async fn a_salesforce_answer_without_instance_url_is_refused_and_stores_nothing() {
    let server = PortalServer::start().await;
    server.workflow_ids().await;
    server.crm.standin.set_oauth(OAuthSettings {
        omit_instance_url: true,
        ..oauth_clients(&server)
    });
    let mut ada = signed_in(&server, "ada").await;

    let answer = ada
        .connect_and_approve("ada", "salesforce", "ada@sf.example")
        .await;

    assert_eq!(answer.status, 502);
    assert!(answer.body.contains("no instance_url"), "{}", answer.body);
    assert!(server.connections("ada").await.is_empty());
    server.assert_no_secret_logged(&[]);
    server.stop().await;
}

/// A user token as a careless or hostile backend would make one.
fn user_token(key: &str, kid: &str, claims: serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()).expect("key"),
    )
    .expect("token")
}

#[tokio::test]
async fn expired_and_forged_user_tokens_open_nothing() {
    let server = PortalServer::start().await;
    server.workflow_ids().await;
    let expired = user_token(
        TOKEN_KEY,
        TOKEN_KID,
        json!({"sub": "ada", "aud": "appevents", "exp": now() - 1}),
    );
    let forged = user_token(
        "someone-elses-key-of-at-least-32-bytes",
        TOKEN_KID,
        json!({"sub": "ada", "aud": "appevents", "exp": now() + 60}),
    );
    let unknown_kid = user_token(
        TOKEN_KEY,
        "k9",
        json!({"sub": "ada", "aud": "appevents", "exp": now() + 60}),
    );
    let too_long = user_token(
        TOKEN_KEY,
        TOKEN_KID,
        json!({"sub": "ada", "aud": "appevents", "exp": now() + 86_400}),
    );

    for token in [
        &expired,
        &forged,
        &unknown_kid,
        &too_long,
        &"garbage".to_owned(),
    ] {
        let mut visitor = server.visitor();
        let answer = visitor.get(&format!("/portal/ada?token={token}")).await;
        assert_eq!(answer.status, 401, "{}", answer.body);
        assert!(
            answer.body.contains("invalid or has expired"),
            "{}",
            answer.body
        );
        assert!(answer.headers.get("set-cookie").is_none());
    }
    assert_eq!(server.count("web_sessions").await, 0);
    server.assert_no_secret_logged(&[&expired, &forged, &unknown_kid, &too_long]);
    server.stop().await;
}

#[tokio::test]
async fn a_token_or_session_of_one_user_opens_nothing_of_another() {
    let server = PortalServer::start().await;
    server.workflow_ids().await;
    let ada_token = server.token("ada");
    let mut visitor = server.visitor();

    let answer = visitor.get(&format!("/portal/bob?token={ada_token}")).await;

    assert_eq!(answer.status, 403);
    assert!(
        answer.body.contains("made for another user"),
        "{}",
        answer.body
    );
    assert_eq!(server.count("web_sessions").await, 0);
    // Ada's own session does not open Bob's page or act on it either.
    let mut ada = signed_in(&server, "ada").await;
    let csrf = ada.get("/portal/ada").await.csrf();
    let bobs_page = ada.get("/portal/bob").await;
    assert_eq!(bobs_page.status, 403);
    let bobs_connect = ada
        .post("/portal/bob/connect/hubspot", &[("csrf", &csrf)])
        .await;
    assert_eq!(bobs_connect.status, 403);
    assert_eq!(server.count("oauth_authorizations").await, 0);
    server.assert_no_secret_logged(&[&ada_token]);
    server.stop().await;
}

#[tokio::test]
async fn a_user_token_opens_one_session_only() {
    let server = PortalServer::start().await;
    server.workflow_ids().await;
    let token = server.token("ada");
    let mut first = server.visitor();
    assert_eq!(first.enter("ada", &token).await.status, 200);

    let mut second = server.visitor();
    let again = second.get(&format!("/portal/ada?token={token}")).await;

    assert_eq!(again.status, 401);
    assert!(again.body.contains("used already"), "{}", again.body);
    assert_eq!(server.count("web_sessions").await, 1);
    server.assert_no_secret_logged(&[&token]);
    server.stop().await;
}

#[tokio::test]
async fn a_form_without_the_sessions_csrf_token_changes_nothing() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let hubspot = server.workflow_of(Provider::Hubspot).await;
    ada.connect_and_approve("ada", "hubspot", "ada@hs.example")
        .await;
    let connection = server.connections("ada").await.remove(0);

    for (path, form) in [
        (
            format!("/portal/ada/workflows/{hubspot}"),
            vec![("on", "true")],
        ),
        (
            format!("/portal/ada/workflows/{hubspot}"),
            vec![("on", "true"), ("csrf", "wrong")],
        ),
        (
            format!("/portal/ada/connections/{}/disconnect", connection.id),
            vec![],
        ),
        (
            "/portal/ada/connect/salesforce".to_owned(),
            vec![("csrf", "")],
        ),
    ] {
        let answer = ada.post(&path, &form).await;
        assert_eq!(answer.status, 403, "{path}: {}", answer.body);
        assert!(
            answer.body.contains("This form has expired"),
            "{}",
            answer.body
        );
    }

    assert_eq!(server.count("subscriptions").await, 0);
    assert_eq!(server.connections("ada").await.len(), 1);
    assert_eq!(server.count("oauth_authorizations").await, 0);
    server.stop().await;
}

#[tokio::test]
async fn the_pages_send_their_security_headers_and_no_secret() {
    let server = PortalServer::start_with(|s| {
        s.portal.frame_ancestors = vec!["https://app.example.com".into()];
    })
    .await;
    server.workflow_ids().await;
    let token = server.token("ada");
    let mut ada = server.visitor();

    let page = ada.enter("ada", &token).await;

    let csp = page.headers["content-security-policy"]
        .to_str()
        .expect("ascii");
    assert!(
        csp.contains("frame-ancestors https://app.example.com;"),
        "{csp}"
    );
    assert!(
        csp.contains(&format!("form-action 'self' {}", server.crm.url())),
        "{csp}"
    );
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(page.headers["referrer-policy"], "no-referrer");
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    let cookie = server
        .visitor()
        .get(&format!("/portal/ada?token={}", server.token("ada")))
        .await;
    let set = cookie.headers["set-cookie"].to_str().expect("ascii");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax") && set.contains("Path=/portal"),
        "{set}"
    );
    for secret in [token.as_str(), CLIENT_SECRET, "test-key-1", "test-key-2"] {
        assert!(!page.body.contains(secret), "{secret} in the page");
    }
    assert!(!page.body.contains("<script"), "no script needed");
    server.stop().await;
}

#[tokio::test]
async fn the_users_token_command_prints_a_token_the_portal_accepts() {
    let server = PortalServer::start().await;
    let config = server.config.to_str().expect("utf-8 path").to_owned();
    let run = |args: &'static [&'static str]| {
        let mut all = vec!["--config", config.as_str(), "users", "token"];
        all.extend_from_slice(args);
        crate::support::appevents_command(&server.app.settings, &all).output()
    };

    let printed = run(&["--user", "ada", "--ttl", "2m"]).await.expect("run");
    let too_long = run(&["--user", "ada", "--ttl", "2h"]).await.expect("run");
    let bad_ttl = run(&["--user", "ada", "--ttl", "soon"]).await.expect("run");

    assert!(printed.status.success(), "{printed:?}");
    let token = String::from_utf8_lossy(&printed.stdout).trim().to_owned();
    let page = server.visitor().enter("ada", &token).await;
    assert_eq!(page.status, 200);
    assert_eq!(too_long.status.code(), Some(1));
    let error = String::from_utf8_lossy(&too_long.stderr);
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(error.contains("max_lifetime"), "{error}");
    assert_eq!(bad_ttl.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&bad_ttl.stderr).lines().count(), 1);
    server.stop().await;
}

#[tokio::test]
async fn two_callbacks_racing_for_one_user_leave_one_connection() {
    let (server, mut ada) = ada_signed_in(|_| {}).await;
    let (_, first) = ada.approved("ada", "hubspot", "ada@one.example").await;
    let (_, second) = ada.approved("ada", "hubspot", "ada@two.example").await;
    let mut other_tab = server.visitor();
    other_tab.cookie = ada.cookie.clone();

    let (a, b) = tokio::join!(ada.get(&first), other_tab.get(&second));

    assert_eq!((a.status, b.status), (303, 303), "{} {}", a.body, b.body);
    let stored = server.connections("ada").await;
    assert_eq!(stored.len(), 1, "{stored:#?}");
    let account = stored[0].settings["account"].as_str().expect("account");
    assert!(account.starts_with("ada@one.example") || account.starts_with("ada@two.example"));
    server.stop().await;
}

#[tokio::test]
async fn a_connection_made_in_the_portal_is_refreshed_by_the_worker_through_the_provider() {
    let (mut server, mut ada) = ada_signed_in(|_| {}).await;
    let hubspot = server.workflow_of(Provider::Hubspot).await;
    ada.connect_and_approve("ada", "hubspot", "ada@hs.example")
        .await;
    ada.switch_on("ada", hubspot).await;
    // The access token the flow obtained expires: only tokens issued from now on pass.
    server.crm.standin.set_tokens(appevents_standin::Tokens {
        valid_access: Some(Vec::new()),
        ..appevents_standin::Tokens::default()
    });
    server.app.start_worker().await;

    let (contact, hub) = server
        .publish_and_find_contact("ada", json!({"email": "refreshed@example.com"}))
        .await;

    assert_eq!(contact.account.as_deref(), Some(hub.as_str()));
    let stored = server.connections("ada").await;
    assert!(stored[0].token_refreshed_at.is_some(), "refreshed");
    server.stop().await;
}
