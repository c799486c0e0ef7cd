//! The operator console as an operator reaches it: `appevents serve` in this process with one
//! operator key, a worker against the stand-in CRM, and a client that keeps the console's
//! cookies as a browser without JavaScript would.

#![allow(dead_code)]

use std::collections::BTreeMap;

use appevents::transport::dead_letter::{Reason, ReasonCode};
use appevents::transport::publisher::Publisher;
use appevents_standin as standin;
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{CONTACT_CREATED, SeededLetter, ServerHandle, TestApp};

/// The operator of the tests, and their key.
pub const OPERATOR: &str = "ops-ada";
pub const OPERATOR_KEY: &str = "console-test-operator-key-of-32-chars";

pub struct ConsoleApp {
    pub app: TestApp,
    pub server: ServerHandle,
    pub crm: standin::Running,
    /// The HubSpot workflow, switched on for user "u" against the stand-in.
    pub workflow: Uuid,
}

impl ConsoleApp {
    pub async fn start() -> ConsoleApp {
        let app = TestApp::with_settings(|settings| {
            settings.console.operators =
                BTreeMap::from([(OPERATOR.to_owned(), SecretString::from(OPERATOR_KEY))]);
            settings.console.secure_cookie = false;
        })
        .await;
        let crm = standin::spawn("127.0.0.1:0").await.expect("stand-in");
        let workflow = app.hubspot_workflow(&crm.url()).await;
        let server = ServerHandle::start(&app.settings).await;
        ConsoleApp {
            app,
            server,
            crm,
            workflow,
        }
    }

    pub fn url(&self) -> &str {
        &self.server.url
    }

    /// A client with no session yet.
    pub fn client(&self) -> Client {
        Client {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            url: self.server.url.clone(),
            cookies: BTreeMap::new(),
        }
    }

    /// A client logged in as the test operator.
    pub async fn operator(&self) -> Client {
        let mut client = self.client();
        let login = client.get("/console/login").await;
        let done = client
            .post(
                "/console/login",
                &[
                    ("key", OPERATOR_KEY),
                    ("csrf", &login.csrf()),
                    ("next", "/console"),
                ],
            )
            .await;
        assert_eq!(done.status, 303, "{}", done.body);
        client
    }

    /// Puts a dead letter in the queue as the worker writes one, for user "u" and the
    /// test's workflow, with `reason`.
    pub async fn dead_letter(
        &self,
        event_id: &str,
        payload: Value,
        code: ReasonCode,
        reason: &str,
    ) {
        let publisher = Publisher::open(&self.app.amqp).await.expect("publisher");
        let letter = SeededLetter {
            event_id,
            user: "u",
            workflow: self.workflow,
            payload,
            reason: Reason {
                code,
                text: reason.to_owned(),
            },
            provider_calls: 3,
            failure: None,
        };
        self.app.seed_letter(&publisher, letter).await;
    }

    /// Writes `n` finished runs of the test's workflow for user `user`, a millisecond
    /// apart, the newest first in time; `error` makes them dead with that error message.
    pub async fn runs(&self, user: &str, n: i32, error: Option<&str>) -> Vec<Uuid> {
        let client = self.app.pool.get().await.expect("db");
        let last_error = error.map(|message| {
            json!({"kind": "permanent", "status": 400, "code": "INVALID", "message": message})
        });
        let rows = client
            .query(
                "with made as (insert into runs (id, created_at, updated_at, finished_at, user_id, \
                 event_id, event_name, workflow_id, status, attempts, claims, provider_id, last_error) \
                 select gen_random_uuid(), t, t, t + interval '42 milliseconds', $1, \
                 'evt-' || $1 || '-' || i, $2, $3, \
                 case when $5::jsonb is null then 'succeeded' else 'dead' end, 1, 1, \
                 case when $5::jsonb is null then 'hs-' || i end, $5 \
                 from (select i, now() - i * interval '1 millisecond' as t \
                 from generate_series(1, $4) i) g \
                 returning id, created_at, event_id, user_id, workflow_id) \
                 insert into run_keys (workflow_id, run_id, created_at, event_id, user_id) \
                 select workflow_id, id, created_at, event_id, user_id from made returning run_id",
                &[&user, &CONTACT_CREATED, &self.workflow, &n, &last_error],
            )
            .await
            .expect("runs");
        rows.iter().map(|row| row.get(0)).collect()
    }

    /// The audit log's entries: actor, action, target, outcome.
    pub async fn audit(&self) -> Vec<(String, String, String, Option<String>)> {
        let client = self.app.pool.get().await.expect("db");
        client
            .query(
                "select actor, action, target, outcome from audit_log order by id",
                &[],
            )
            .await
            .expect("audit")
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
            .collect()
    }

    pub async fn stop(self) {
        self.server.stop().await;
        self.app.cleanup().await;
    }
}

/// An answer: status, headers, body.
#[derive(Debug)]
pub struct Page {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Page {
    /// The CSRF token of the page's first form.
    pub fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let start = self.body.find(marker).expect("a form with a CSRF token") + marker.len();
        let end = self.body[start..].find('"').expect("closing quote") + start;
        self.body[start..end].to_owned()
    }

    pub fn location(&self) -> Option<&str> {
        self.headers.get("location").and_then(|v| v.to_str().ok())
    }

    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }
}

/// Keeps cookies, follows nothing by itself.
pub struct Client {
    http: reqwest::Client,
    url: String,
    pub cookies: BTreeMap<String, String>,
}

impl Client {
    async fn answer(&mut self, response: reqwest::Response) -> Page {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        for set in headers.get_all("set-cookie") {
            let Some((name, value)) = set
                .to_str()
                .ok()
                .and_then(|v| v.split(';').next())
                .and_then(|v| v.split_once('='))
            else {
                continue;
            };
            if value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        let body = response.text().await.unwrap_or_default();
        Page {
            status,
            headers,
            body,
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub async fn get(&mut self, path: &str) -> Page {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .expect("GET");
        self.answer(response).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await
            .expect("POST");
        self.answer(response).await
    }
}
