//! The Connect Portal as the product runs it: `appevents serve` (the real binary, its JSON
//! logs kept so a test can prove no secret reached them) configured against a stand-in CRM
//! that plays both providers' OAuth apps, and a visitor that walks the pages over HTTP as a
//! browser without JavaScript would.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appevents::config::{OAuthApp, Settings};
use appevents::core::user_token::KeyRing;
use appevents_standin as standin;
use appevents_standin::oauth::{OAuthClient, OAuthSettings};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncBufReadExt;

use appevents::core::provider::Provider;
use serde_json::json;

use super::{CONTACT_CREATED, TestApp, appevents_command, eventually, http_client};

/// The user-token key of the tests, and its kid.
pub const TOKEN_KID: &str = "portal-test";
pub const TOKEN_KEY: &str = "portal-test-user-token-key-of-32-bytes";
/// What the stand-in's OAuth apps are called, and their secrets (never in a log).
pub const SALESFORCE_CLIENT: &str = "test-salesforce-app";
pub const HUBSPOT_CLIENT: &str = "test-hubspot-app";
pub const CLIENT_SECRET: &str = "test-client-secret-never-logged";

/// A port free now: the server's callback URLs must name it before it starts.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

pub struct PortalServer {
    pub app: TestApp,
    pub crm: standin::Running,
    /// `http://127.0.0.1:PORT`, the portal's origin.
    pub url: String,
    child: tokio::process::Child,
    logs: Arc<Mutex<String>>,
    /// The `--config` file `serve` runs with.
    pub config: std::path::PathBuf,
    _config_dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl PortalServer {
    pub async fn start() -> PortalServer {
        Self::start_with(|_| {}).await
    }

    /// Starts the stand-in and `appevents serve`, with the settings `adjust` changes.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> PortalServer {
        let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let crm_url = crm.url();
        let app = TestApp::with_settings(|settings| {
            configure(settings, &url, &crm_url, port);
            adjust(settings);
        })
        .await;
        crm.standin.set_oauth(OAuthSettings {
            clients: clients(&app.settings),
            ..OAuthSettings::default()
        });
        let dir =
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("portal-{}", app.tag));
        std::fs::create_dir_all(&dir).expect("config dir");
        let config = dir.join("portal.toml");
        std::fs::write(&config, portal_toml(&app.settings)).expect("config file");
        let mut command = appevents_command(
            &app.settings,
            &["--config", config.to_str().expect("utf-8 path"), "serve"],
        );
        command
            .env("RUST_LOG", "appevents=debug,info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("appevents serve");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut logs = sink.lock().expect("logs");
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let health = format!("{url}/healthz");
        let up = eventually(Duration::from_secs(30), || async {
            http_client()
                .get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(
            up,
            "appevents serve did not come up: {}",
            logs.lock().expect("logs")
        );
        PortalServer {
            app,
            crm,
            url,
            child,
            logs,
            config,
            _config_dir: TempDir(dir),
        }
    }

    /// `Contact Created` with a workflow for each provider; returns (salesforce, hubspot).
    pub async fn workflow_ids(&self) -> (uuid::Uuid, uuid::Uuid) {
        let app = &self.app;
        app.app_event(CONTACT_CREATED).await;
        let salesforce = app
            .workflow(
                "New contacts to Salesforce",
                CONTACT_CREATED,
                Provider::Salesforce,
                "create",
                json!({}),
                json!({"Email": "{{payload.email}}", "LastName": "{{payload.last_name}}"}),
            )
            .await;
        let hubspot = app
            .workflow(
                "New contacts to HubSpot",
                CONTACT_CREATED,
                Provider::Hubspot,
                "create-contact",
                json!({}),
                json!({"email": "{{payload.email}}", "firstname": "{{payload.first_name}}"}),
            )
            .await;
        (salesforce.id, hubspot.id)
    }

    /// The id of the workflow of `provider` that [`PortalServer::workflow_ids`] made.
    pub async fn workflow_of(&self, provider: Provider) -> uuid::Uuid {
        appevents::catalog::workflows::list(&self.app.pool, Some(CONTACT_CREATED), None)
            .await
            .expect("workflows")
            .into_iter()
            .find(|w| w.provider == provider)
            .expect("a workflow of that provider")
            .id
    }

    /// Publishes `Contact Created` for `user` with `payload` and waits for its one run to
    /// succeed; returns the contact the stand-in then holds for the payload's email, and the
    /// account id of the user's connection of its provider.
    pub async fn publish_and_find_contact(
        &self,
        user: &str,
        payload: serde_json::Value,
    ) -> (standin::Record, String) {
        let email = payload["email"].clone();
        let event = self.app.publish(CONTACT_CREATED, user, payload, None).await;
        self.app
            .wait_for_runs(&event, 1, appevents::pipeline::runs::RunStatus::Succeeded)
            .await;
        let contact = self
            .crm
            .standin
            .records()
            .into_iter()
            .find(|r| r.fields.get("email") == Some(&email))
            .expect("the contact");
        let connection = self
            .connections(user)
            .await
            .into_iter()
            .find(|c| c.provider.as_str() == contact.provider)
            .expect("the user's connection of that provider");
        let account = connection.settings["account_id"]
            .as_str()
            .expect("an account id")
            .to_owned();
        (contact, account)
    }

    /// A user token for `user`, as the product's backend mints one.
    pub fn token(&self, user: &str) -> String {
        KeyRing::from_settings(&self.app.settings.user_tokens)
            .expect("key ring")
            .sign(user, Duration::from_secs(300))
            .expect("token")
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().expect("logs").clone()
    }

    /// The logs hold no token, code, secret or verifier: not the client secret, not the
    /// user tokens given, not anything the stand-in issued (its tokens and codes all start
    /// with `standin-`).
    pub fn assert_no_secret_logged(&self, user_tokens: &[&str]) {
        let logs = self.logs();
        assert!(
            !logs.is_empty(),
            "the server logged nothing: the check would prove nothing"
        );
        for secret in [CLIENT_SECRET, "standin-", "code_verifier", TOKEN_KEY]
            .into_iter()
            .chain(user_tokens.iter().copied())
        {
            assert!(!logs.contains(secret), "{secret:?} is in the logs:\n{logs}");
        }
    }

    pub fn visitor(&self) -> Visitor {
        Visitor {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            url: self.url.clone(),
            cookie: None,
        }
    }

    /// Connections of a user, as stored.
    pub async fn connections(
        &self,
        user: &str,
    ) -> Vec<appevents::catalog::connections::ConnectionSummary> {
        appevents::catalog::connections::list(&self.app.pool, Some(user))
            .await
            .expect("connections")
    }

    /// Rows of a table: to prove a refused request stored nothing.
    pub async fn count(&self, table: &str) -> i64 {
        let client = self.app.pool.get().await.expect("db");
        client
            .query_one(&format!("select count(*) from {table}"), &[])
            .await
            .expect("count")
            .get(0)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        self.crm.task.abort();
        self.app.cleanup().await;
    }
}

/// The stand-in's clients for the server's apps: the redirect URLs registered exactly, and
/// one more that is not the server's (for the mismatch case).
pub fn clients(settings: &Settings) -> Vec<OAuthClient> {
    [
        ("salesforce", &settings.oauth.salesforce.app),
        ("hubspot", &settings.oauth.hubspot.app),
    ]
    .into_iter()
    .map(|(provider, app)| OAuthClient {
        provider: provider.to_owned(),
        client_id: app.client_id.clone(),
        client_secret: CLIENT_SECRET.to_owned(),
        redirect_uris: vec![app.redirect_url.clone(), OTHER_REDIRECT.to_owned()],
    })
    .collect()
}

/// A redirect URI the stand-in's clients also registered, which is not the server's.
pub const OTHER_REDIRECT: &str = "http://elsewhere.test/oauth/callback";

fn configure(settings: &mut Settings, url: &str, crm: &str, port: u16) {
    settings.server.listen = format!("127.0.0.1:{port}");
    settings.user_tokens.keys =
        BTreeMap::from([(TOKEN_KID.to_owned(), SecretString::from(TOKEN_KEY))]);
    settings.user_tokens.signing_key = TOKEN_KID.to_owned();
    settings.portal.secure_cookie = false;
    let app = |client: &str, provider: &str, pkce: bool| OAuthApp {
        client_id: client.to_owned(),
        client_secret: SecretString::from(CLIENT_SECRET),
        scopes: vec!["api".into(), "refresh_token".into()],
        redirect_url: format!("{url}/portal/oauth/{provider}/callback"),
        pkce,
    };
    settings.oauth.salesforce.app = app(SALESFORCE_CLIENT, "salesforce", true);
    settings.oauth.salesforce.login_url = crm.to_owned();
    settings.oauth.hubspot.app = app(HUBSPOT_CLIENT, "hubspot", false);
    settings.oauth.hubspot.authorize_url = format!("{crm}/oauth/authorize");
    settings.oauth.hubspot.api_url = crm.to_owned();
}

/// The settings `serve` needs beyond what the environment carries, as a `--config` file.
fn portal_toml(settings: &Settings) -> String {
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("{i:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let app = |app: &OAuthApp| {
        format!(
            "client_id = {:?}\nclient_secret = {:?}\nscopes = [{}]\nredirect_url = {:?}\npkce = {}\n",
            app.client_id,
            app.client_secret.expose_secret(),
            list(&app.scopes),
            app.redirect_url,
            app.pkce
        )
    };
    let keys: Vec<String> = settings
        .user_tokens
        .keys
        .iter()
        .map(|(kid, key)| format!("{kid:?} = {:?}", key.expose_secret()))
        .collect();
    let api_keys: Vec<String> = settings
        .server
        .api_keys
        .iter()
        .map(|k| k.expose_secret().to_owned())
        .collect();
    format!(
        "[server]\nlisten = {:?}\napi_keys = [{}]\n\n\
         [user_tokens]\nkeys = {{ {} }}\nsigning_key = {:?}\nmax_lifetime = \"{}s\"\n\n\
         [portal]\nsecure_cookie = {}\nframe_ancestors = [{}]\nauthorization_ttl = \"{}s\"\n\n\
         [oauth.salesforce]\n{}login_url = {:?}\n\n[oauth.hubspot]\n{}authorize_url = {:?}\napi_url = {:?}\n",
        settings.server.listen,
        list(&api_keys),
        keys.join(", "),
        settings.user_tokens.signing_key,
        settings.user_tokens.max_lifetime.as_secs(),
        settings.portal.secure_cookie,
        list(&settings.portal.frame_ancestors),
        settings.portal.authorization_ttl.as_secs(),
        app(&settings.oauth.salesforce.app),
        settings.oauth.salesforce.login_url,
        app(&settings.oauth.hubspot.app),
        settings.oauth.hubspot.authorize_url,
        settings.oauth.hubspot.api_url,
    )
}

/// An answer: its status, where it redirects, its body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
    pub headers: reqwest::header::HeaderMap,
}

impl Answer {
    /// The CSRF token the page's forms carry.
    pub fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let start = self.body.find(marker).expect("a form with a CSRF token") + marker.len();
        let end = self.body[start..].find('"').expect("closing quote") + start;
        self.body[start..end].to_owned()
    }
}

/// A browser without JavaScript: follows nothing by itself, keeps the portal's cookie.
pub struct Visitor {
    client: reqwest::Client,
    url: String,
    pub cookie: Option<String>,
}

impl Visitor {
    async fn answer(&mut self, response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        if let Some(set) = headers
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .and_then(|v| v.strip_prefix("appevents_portal="))
        {
            self.cookie = Some(set.to_owned());
        }
        let location = headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.text().await.unwrap_or_default();
        Answer {
            status,
            location,
            body,
            headers,
        }
    }

    fn absolute(&self, url: &str) -> String {
        if url.starts_with('/') {
            format!("{}{url}", self.url)
        } else {
            url.to_owned()
        }
    }

    pub async fn get(&mut self, url: &str) -> Answer {
        let mut request = self.client.get(self.absolute(url));
        if let Some(cookie) = &self.cookie
            && self.absolute(url).starts_with(&self.url)
        {
            request = request.header("cookie", format!("appevents_portal={cookie}"));
        }
        let response = request.send().await.expect("GET");
        self.answer(response).await
    }

    pub async fn post(&mut self, url: &str, form: &[(&str, &str)]) -> Answer {
        let mut request = self.client.post(self.absolute(url)).form(form);
        if let Some(cookie) = &self.cookie
            && self.absolute(url).starts_with(&self.url)
        {
            request = request.header("cookie", format!("appevents_portal={cookie}"));
        }
        let response = request.send().await.expect("POST");
        self.answer(response).await
    }

    /// Opens the portal with a token, as the product's iframe does; returns the page.
    pub async fn enter(&mut self, user: &str, token: &str) -> Answer {
        let entry = self.get(&format!("/portal/{user}?token={token}")).await;
        assert_eq!(entry.status, 303, "{}", entry.body);
        assert_eq!(
            entry.location.as_deref(),
            Some(format!("/portal/{user}").as_str())
        );
        self.get(&format!("/portal/{user}")).await
    }

    /// Presses Connect: returns the provider's authorize URL the portal sends the browser to.
    pub async fn connect(&mut self, user: &str, provider: &str) -> String {
        let page = self.get(&format!("/portal/{user}")).await;
        let started = self
            .post(
                &format!("/portal/{user}/connect/{provider}"),
                &[("csrf", &page.csrf())],
            )
            .await;
        assert_eq!(started.status, 303, "{}", started.body);
        started.location.expect("the authorize URL")
    }

    /// Decides at the stand-in's authorize page (`approve` or `deny`), as the person
    /// logged in as `login`; returns the stand-in's answer (a redirect back, or a page).
    pub async fn decide(&mut self, authorize_url: &str, decision: &str, login: &str) -> Answer {
        let page = self.get(authorize_url).await;
        assert_eq!(page.status, 200, "the authorize page: {}", page.body);
        let url = Url::parse(authorize_url).expect("authorize URL");
        let mut form: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "response_type")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        form.push(("decision".into(), decision.into()));
        form.push(("login".into(), login.into()));
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let target = format!("{}{}", url.origin().ascii_serialization(), url.path());
        self.post(&target, &form).await
    }

    /// Connects and approves as `login`: returns the authorize URL and the callback the
    /// provider redirected to, not yet followed.
    pub async fn approved(&mut self, user: &str, provider: &str, login: &str) -> (String, String) {
        let authorize = self.connect(user, provider).await;
        let approved = self.decide(&authorize, "approve", login).await;
        let callback = approved.location.expect("a redirect back with a code");
        (authorize, callback)
    }

    /// Switches a workflow on from the portal page, as its switch does.
    pub async fn switch_on(&mut self, user: &str, workflow: uuid::Uuid) -> Answer {
        let page = self.get(&format!("/portal/{user}")).await;
        self.post(
            &format!("/portal/{user}/workflows/{workflow}"),
            &[("csrf", &page.csrf()), ("on", "true")],
        )
        .await
    }

    /// Connects `provider` for `user` all the way: returns the callback's answer.
    pub async fn connect_and_approve(&mut self, user: &str, provider: &str, login: &str) -> Answer {
        let (_, callback) = self.approved(user, provider, login).await;
        self.get(&callback).await
    }
}
