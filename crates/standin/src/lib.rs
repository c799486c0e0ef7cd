//! A stand-in for Salesforce and HubSpot (and an OAuth token endpoint and an HTTP sink), for
//! the demo, the tests, the chaos run and the benchmark; its own crate, so the product does
//! not ship it. It speaks the subset of both APIs appevents uses, with their success and
//! error shapes, keeps what it is sent in memory, and can be told to fail: a scripted sequence of answers, a fraction of random failures, latency,
//! expired or revoked tokens. Tests of single behaviours use wiremock instead.
//!
//! Inspection and control, under `/_standin/`:
//! - `GET records`: every record, per provider and object, with how many times each was
//!   created and updated;
//! - `GET requests`: the log of API requests (method, path, status);
//!
//! HubSpot's contact and company searches (`POST /crm/v3/objects/{contacts|companies}/search`)
//! take `filterGroups` (ORed; each group's `filters` ANDed) with EQ, NEQ, GT, GTE, LT and
//! LTE, `createdate` in epoch milliseconds, and `limit`, and answer
//! `{"total", "results": [{"id", "properties"}]}`.
//!
//! Batch endpoints: HubSpot's `POST /crm/v3/objects/contacts/batch/{create,update,upsert}`
//! (at most 100 inputs; inputs with an `objectWriteTraceId` get multi-status answers, `207`
//! with per-input errors naming the trace id) and Salesforce's sObject Collections
//! (`POST /services/data/{version}/composite/sobjects`, `PATCH
//! .../composite/sobjects/{sObject}/{externalIdField}`, at most 200 records, an array of
//! per-record results, `allOrNone`).
//!
//! Salesforce's SOQL endpoint (`GET /services/data/{version}/query?q=`) understands the
//! subset appevents sends: `SELECT Id FROM {sObject} WHERE {field} = {literal} [AND ...]`,
//! with string literals in SOQL's escapes, `null`, numbers, booleans, and
//! `CreatedDate >= {dateTime}` (`2026-12-07T11:00:00Z`); anything else is answered 400
//! `MALFORMED_QUERY`, as Salesforce does.
//! - `POST faults` `{"fail_rate": 0.1, "fail_status": 500, "latency_ms": 5, "script": [{"status": 429, "retry_after": 1}]}`;
//! - `POST tokens` `{"valid_access": ["a"], "valid_refresh": ["r"], "rotate_refresh": true}`:
//!   from then on only these access tokens are accepted (any is, until this is called);
//! - `POST oauth` `{"clients": [{"provider": "hubspot", "client_id": "…", "client_secret": "…", "redirect_uris": ["…"]}], "omit_instance_url": false, "hubspot_deny_redirects": false, "fail_revoke": null}`:
//!   the OAuth side ([`oauth`]): clients known besides the built-in two, and its faults;
//! - `POST limits`: per-account limits and the limit headers ([`limits`]);
//! - `POST reset`.
//!
//! Records created with an access token the OAuth side issued carry that account's id, so a
//! test can tell in whose account a contact was made, and with which grant.

pub mod limits;
pub mod oauth;
mod soql;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// One stored record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub provider: String,
    pub object: String,
    pub id: String,
    pub fields: Map<String, Value>,
    pub creates: u32,
    pub updates: u32,
    /// The account (Salesforce org, HubSpot hub) whose OAuth access token created it.
    #[serde(default)]
    pub account: Option<String>,
    /// When it was created, in seconds since the Unix epoch (Salesforce's `CreatedDate`).
    #[serde(default)]
    pub created: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// A scripted answer, used before the route's real behaviour.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScriptedAnswer {
    pub status: u16,
    #[serde(default)]
    pub retry_after: Option<u64>,
    #[serde(default)]
    pub body: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Faults {
    /// Fraction of API calls answered with `fail_status` before doing anything.
    #[serde(default)]
    pub fail_rate: f64,
    #[serde(default = "default_fail_status")]
    pub fail_status: u16,
    #[serde(default)]
    pub latency_ms: u64,
    /// Answers for the next calls, in order.
    #[serde(default)]
    pub script: Vec<ScriptedAnswer>,
}

fn default_fail_status() -> u16 {
    500
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tokens {
    /// When set, only these access tokens are accepted.
    #[serde(default)]
    pub valid_access: Option<Vec<String>>,
    #[serde(default)]
    pub valid_refresh: Vec<String>,
    /// Hand out a new refresh token on each refresh (and retire the old one).
    #[serde(default)]
    pub rotate_refresh: bool,
}

#[derive(Default)]
struct Inner {
    records: Vec<Record>,
    requests: Vec<LoggedRequest>,
    fail_rate: f64,
    fail_status: u16,
    latency: Duration,
    script: VecDeque<ScriptedAnswer>,
    valid_access: Option<HashSet<String>>,
    valid_refresh: HashSet<String>,
    rotate_refresh: bool,
    issued: u64,
    next_id: u64,
    /// Answer as usual but keep no records or request log (for benchmarks).
    forget: bool,
    oauth: oauth::OAuth,
    limits: limits::Limits,
}

#[derive(Clone, Default)]
pub struct Standin {
    inner: Arc<Mutex<Inner>>,
}

/// A stand-in serving on a local port.
pub struct Running {
    pub addr: SocketAddr,
    pub standin: Standin,
    pub task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Serves a fresh stand-in on `addr` (port 0 for any free port) in a background task.
pub async fn spawn(addr: &str) -> std::io::Result<Running> {
    spawn_with(addr, false).await
}

/// As [`spawn`]; with `forget`, it answers as usual but keeps no records or request log, so
/// its memory stays flat under millions of calls (benchmarks).
pub async fn spawn_with(addr: &str, forget: bool) -> std::io::Result<Running> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let standin = Standin::default();
    standin.lock().forget = forget;
    let app = standin.router();
    // Nagle's algorithm off: a response written in two pieces must not wait for the
    // client's delayed acknowledgement (tens of milliseconds), which would skew benchmarks.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        let _ = stream.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "stand-in CRM stopped");
        }
    });
    Ok(Running {
        addr,
        standin,
        task,
    })
}

impl Standin {
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/services/data/{version}/sobjects/{sobject}/",
                post(salesforce_create),
            )
            .route(
                "/services/data/{version}/sobjects/{sobject}",
                post(salesforce_create),
            )
            .route(
                "/services/data/{version}/sobjects/{sobject}/{field}/{value}",
                patch(salesforce_upsert),
            )
            .route(
                "/services/data/{version}/sobjects/{sobject}/{id}",
                patch(salesforce_update),
            )
            .route("/crm/v3/objects/companies", post(hubspot_create_company))
            .route(
                "/crm/v4/objects/contact/{contact}/associations/default/company/{company}",
                axum::routing::put(hubspot_associate),
            )
            .route("/services/data/{version}/query", get(salesforce_query))
            .route("/crm/v3/objects/contacts", post(hubspot_create))
            .route(
                "/crm/v3/objects/contacts/search",
                post(|s: State<Standin>, m, u, h, b| hubspot_search(s, "contacts", m, u, h, b)),
            )
            .route(
                "/crm/v3/objects/companies/search",
                post(|s: State<Standin>, m, u, h, b| hubspot_search(s, "companies", m, u, h, b)),
            )
            .route("/crm/v3/objects/contacts/batch/{verb}", post(hubspot_batch))
            .route(
                "/services/data/{version}/composite/sobjects",
                post(salesforce_collection),
            )
            .route(
                "/services/data/{version}/composite/sobjects/{sobject}/{field}",
                patch(salesforce_collection),
            )
            .route("/crm/v3/objects/contacts/{id}", patch(hubspot_update))
            .route("/oauth/token", post(token))
            .route(
                "/services/oauth2/authorize",
                get(|s: State<Standin>, q| oauth::authorize_page(s, "salesforce", q))
                    .post(|s: State<Standin>, f| oauth::decide(s, "salesforce", f)),
            )
            .route(
                "/oauth/authorize",
                get(|s: State<Standin>, q| oauth::authorize_page(s, "hubspot", q))
                    .post(|s: State<Standin>, f| oauth::decide(s, "hubspot", f)),
            )
            .route(
                "/services/oauth2/token",
                post(|s: State<Standin>, h, f| oauth::token(s, "salesforce", h, f)),
            )
            .route(
                "/oauth/v1/token",
                post(|s: State<Standin>, h, f| oauth::token(s, "hubspot", h, f)),
            )
            .route("/services/oauth2/revoke", post(oauth::salesforce_revoke))
            .route("/id/{org}/{user}", get(oauth::identity))
            .route(
                "/oauth/v1/access-tokens/{token}",
                get(oauth::access_token_info),
            )
            .route(
                "/oauth/v1/refresh-tokens/{token}",
                axum::routing::delete(oauth::hubspot_revoke),
            )
            .route("/_standin/oauth", post(set_oauth))
            .route(
                "/hooks/{*path}",
                post(hook).put(hook).patch(hook).delete(hook).get(hook),
            )
            .route("/_standin/records", get(records))
            .route("/_standin/requests", get(requests))
            .route("/_standin/faults", post(set_faults))
            .route("/_standin/tokens", post(set_tokens))
            .route("/_standin/reset", post(reset))
            .route("/_standin/limits", post(set_limits).get(limit_counts))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                limits::enforce,
            ))
            .with_state(self.clone())
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn records(&self) -> Vec<Record> {
        self.lock().records.clone()
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock().requests.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        let mut inner = self.lock();
        inner.fail_rate = faults.fail_rate;
        inner.fail_status = faults.fail_status;
        inner.latency = Duration::from_millis(faults.latency_ms);
        inner.script = faults.script.into();
    }

    /// Per-account limits ([`limits`]).
    pub fn set_limits(&self, settings: limits::LimitSettings) {
        self.lock().limits.configure(settings);
    }

    /// HubSpot calls answered 429 for being over the account's limit.
    pub fn refused_for_limit(&self) -> u64 {
        self.lock().limits.refused
    }

    /// Configures the OAuth side: clients to know, and its faults.
    pub fn set_oauth(&self, settings: oauth::OAuthSettings) {
        self.lock().oauth.configure(settings);
    }

    pub fn set_tokens(&self, tokens: Tokens) {
        let mut inner = self.lock();
        inner.valid_access = tokens.valid_access.map(|t| t.into_iter().collect());
        inner.valid_refresh = tokens.valid_refresh.into_iter().collect();
        inner.rotate_refresh = tokens.rotate_refresh;
    }

    /// Runs the checks every API call goes through: latency, scripted and random faults,
    /// the bearer token. `Some` is the answer to give instead of the real one.
    async fn gate(
        &self,
        provider: Provider,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Option<Response> {
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut inner = self.lock();
        if let Some(answer) = inner.script.pop_front() {
            return Some(inner.log(method, uri, scripted(provider, &answer)));
        }
        if inner.fail_rate > 0.0 && fastrand::f64() < inner.fail_rate {
            let answer = ScriptedAnswer {
                status: inner.fail_status,
                ..ScriptedAnswer::default()
            };
            return Some(inner.log(method, uri, scripted(provider, &answer)));
        }
        if let Some(valid) = &inner.valid_access {
            let token = bearer(headers);
            if !token.is_some_and(|t| valid.contains(t)) {
                return Some(inner.log(method, uri, expired(provider)));
            }
        }
        if bearer(headers).is_some_and(|t| inner.oauth.revoked.contains(t)) {
            return Some(inner.log(method, uri, expired(provider)));
        }
        None
    }

    /// The account whose OAuth access token a request carries, if the OAuth side issued it.
    pub(crate) fn account_of(&self, headers: &HeaderMap) -> Option<String> {
        let token = bearer(headers)?;
        self.lock().oauth.access.get(token).map(|a| a.id.clone())
    }
}

impl Inner {
    pub(crate) fn log(&mut self, method: &Method, uri: &Uri, response: Response) -> Response {
        if self.forget {
            return response;
        }
        self.requests.push(LoggedRequest {
            method: method.to_string(),
            path: uri.path().to_owned(),
            status: response.status().as_u16(),
        });
        response
    }

    fn keep(&mut self, mut record: Record) {
        record.created = now_unix();
        if !self.forget {
            self.records.push(record);
        }
    }

    /// Keeps a new HubSpot record of `object` and answers 201 with it.
    fn create_hubspot(
        &mut self,
        object: &str,
        fields: Map<String, Value>,
        account: Option<String>,
    ) -> Response {
        let record = Record {
            provider: "hubspot".into(),
            object: object.into(),
            id: self.new_id(""),
            fields,
            creates: 1,
            updates: 0,
            account,
            created: 0,
        };
        let response = reply(StatusCode::CREATED, contact(&record, true));
        self.keep(record);
        response
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        if prefix.is_empty() {
            self.next_id.to_string()
        } else {
            // Salesforce ids are 18 characters, prefixed by object type.
            format!("{prefix}{:015}", self.next_id)
        }
    }

    /// The record of one account (each sees only its own) with `field` = `value`.
    fn find(
        &mut self,
        account: &Option<String>,
        provider: &str,
        object: &str,
        field: &str,
        value: &str,
    ) -> Option<&mut Record> {
        self.records.iter_mut().find(|r| {
            r.provider == provider
                && r.account == *account
                && r.object == object
                && r.fields.get(field).is_some_and(|v| text(v) == value)
        })
    }
}

#[derive(Clone, Copy)]
enum Provider {
    Salesforce,
    Hubspot,
    Http,
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn reply(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn scripted(provider: Provider, answer: &ScriptedAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = answer
        .body
        .clone()
        .unwrap_or_else(|| error_body(provider, status));
    let mut response = reply(status, body);
    if let Some(seconds) = answer.retry_after
        && let Ok(value) = seconds.to_string().parse()
    {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

/// Each provider's error shape for a status.
fn error_body(provider: Provider, status: StatusCode) -> Value {
    match provider {
        Provider::Salesforce => {
            let code = match status.as_u16() {
                401 => "INVALID_SESSION_ID",
                403 => "REQUEST_LIMIT_EXCEEDED",
                400 => "INVALID_FIELD",
                404 => "NOT_FOUND",
                _ => "UNKNOWN_EXCEPTION",
            };
            json!([{"message": format!("stand-in {}", status), "errorCode": code, "fields": []}])
        }
        Provider::Hubspot => {
            let category = match status.as_u16() {
                429 => "RATE_LIMITS",
                401 => "EXPIRED_AUTHENTICATION",
                400 => "VALIDATION_ERROR",
                _ => "INTERNAL_ERROR",
            };
            let mut body = json!({"status": "error", "message": format!("stand-in {}", status), "category": category});
            if status.as_u16() == 429 {
                body["errorType"] = json!("RATE_LIMIT");
            }
            body
        }
        Provider::Http => json!({"error": format!("stand-in {}", status)}),
    }
}

fn expired(provider: Provider) -> Response {
    let body = match provider {
        Provider::Salesforce => {
            json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])
        }
        Provider::Hubspot => {
            json!({"status": "error", "message": "The OAuth token used to make this call expired.", "category": "EXPIRED_AUTHENTICATION"})
        }
        Provider::Http => json!({"error": "unauthorized"}),
    };
    reply(StatusCode::UNAUTHORIZED, body)
}

fn object_body(body: &Value) -> Map<String, Value> {
    body.as_object().cloned().unwrap_or_default()
}

async fn salesforce_create(
    State(standin): State<Standin>,
    Path(params): Path<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Salesforce, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let sobject = params.get("sobject").cloned().unwrap_or_default();
    let mut inner = standin.lock();
    let fields = object_body(&body);
    if sobject == "Contact" && !fields.contains_key("LastName") {
        let response = reply(
            StatusCode::BAD_REQUEST,
            json!([{"message": "Required fields are missing: [LastName]", "errorCode": "REQUIRED_FIELD_MISSING", "fields": ["LastName"]}]),
        );
        return inner.log(&method, &uri, response);
    }
    let id = inner.new_id("003");
    inner.keep(Record {
        provider: "salesforce".into(),
        object: sobject,
        id: id.clone(),
        fields,
        creates: 1,
        updates: 0,
        account: account.clone(),
        created: 0,
    });
    let response = reply(
        StatusCode::CREATED,
        json!({"id": id, "success": true, "errors": []}),
    );
    inner.log(&method, &uri, response)
}

async fn salesforce_upsert(
    State(standin): State<Standin>,
    Path(params): Path<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Salesforce, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let sobject = params.get("sobject").cloned().unwrap_or_default();
    let field = params.get("field").cloned().unwrap_or_default();
    let value = params.get("value").cloned().unwrap_or_default();
    let mut inner = standin.lock();
    let fields = object_body(&body);
    if let Some(record) = inner.find(&account, "salesforce", &sobject, &field, &value) {
        record.fields.extend(fields);
        record.updates += 1;
        let id = record.id.clone();
        let response = reply(
            StatusCode::OK,
            json!({"id": id, "success": true, "errors": [], "created": false}),
        );
        return inner.log(&method, &uri, response);
    }
    let id = inner.new_id("003");
    let mut fields = fields;
    fields.insert(field, Value::String(value));
    inner.keep(Record {
        provider: "salesforce".into(),
        object: sobject,
        id: id.clone(),
        fields,
        creates: 1,
        updates: 0,
        account: account.clone(),
        created: 0,
    });
    let response = reply(
        StatusCode::CREATED,
        json!({"id": id, "success": true, "errors": [], "created": true}),
    );
    inner.log(&method, &uri, response)
}

async fn salesforce_query(
    State(standin): State<Standin>,
    axum::extract::Query(params): axum::extract::Query<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Salesforce, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let mut inner = standin.lock();
    let query = match soql::parse(params.get("q").map(String::as_str).unwrap_or_default()) {
        Ok(query) => query,
        Err(message) => {
            let response = reply(
                StatusCode::BAD_REQUEST,
                json!([{"message": message, "errorCode": "MALFORMED_QUERY"}]),
            );
            return inner.log(&method, &uri, response);
        }
    };
    let version = uri.path().split('/').nth(3).unwrap_or("v62.0").to_owned();
    let found: Vec<Value> = inner
        .records
        .iter()
        .filter(|r| r.provider == "salesforce" && r.account == account && query.matches(r))
        .take(query.limit.unwrap_or(usize::MAX))
        .map(|r| {
            let mut row = Map::new();
            row.insert(
                "attributes".into(),
                json!({"type": r.object, "url": format!("/services/data/{version}/sobjects/{}/{}", r.object, r.id)}),
            );
            for field in &query.fields {
                let value = if field.eq_ignore_ascii_case("Id") {
                    json!(r.id)
                } else {
                    r.fields.get(field).cloned().unwrap_or(Value::Null)
                };
                row.insert(field.clone(), value);
            }
            Value::Object(row)
        })
        .collect();
    let response = reply(
        StatusCode::OK,
        json!({"totalSize": found.len(), "done": true, "records": found}),
    );
    inner.log(&method, &uri, response)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn properties(body: &Value) -> Map<String, Value> {
    body.get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// HubSpot refuses an email property that is not an address.
fn invalid_email(fields: &Map<String, Value>) -> Option<Response> {
    let email = fields.get("email").map(text)?;
    if email.contains('@') {
        return None;
    }
    Some(reply(
        StatusCode::BAD_REQUEST,
        json!({"status": "error", "message": format!("Property values were not valid: email {email:?} is not a valid email address"), "category": "VALIDATION_ERROR"}),
    ))
}

fn contact(record: &Record, new: bool) -> Value {
    json!({"id": record.id, "properties": record.fields, "archived": false, "new": new})
}

async fn hubspot_create(
    State(standin): State<Standin>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Hubspot, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let fields = properties(&body);
    let mut inner = standin.lock();
    if let Some(invalid) = invalid_email(&fields) {
        return inner.log(&method, &uri, invalid);
    }
    if let Some(email) = fields.get("email").map(text)
        && let Some(existing) = inner.find(&account, "hubspot", "contacts", "email", &email)
    {
        let message = format!("Contact already exists. Existing ID: {}", existing.id);
        let response = reply(
            StatusCode::CONFLICT,
            json!({"status": "error", "message": message, "category": "CONFLICT"}),
        );
        return inner.log(&method, &uri, response);
    }
    let response = inner.create_hubspot("contacts", fields, account);
    inner.log(&method, &uri, response)
}

/// `POST /crm/v3/objects/{object}/search` (contacts, companies): filter groups are ORed, the
/// filters of a group ANDed. Operators EQ and NEQ compare a property's text; GT, GTE, LT and
/// LTE compare numbers, with `createdate` in epoch milliseconds. Anything else is refused as
/// HubSpot refuses it.
async fn hubspot_search(
    State(standin): State<Standin>,
    object: &str,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Hubspot, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let mut inner = standin.lock();
    let groups = body
        .get("filterGroups")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let limit = body.get("limit").and_then(Value::as_u64).unwrap_or(10) as usize;
    let mut matched: Vec<Value> = Vec::new();
    for record in inner
        .records
        .iter()
        .filter(|r| r.provider == "hubspot" && r.object == object && r.account == account)
    {
        let mut any = groups.is_empty();
        for group in &groups {
            let filters = group.get("filters").and_then(Value::as_array);
            let mut all = true;
            for filter in filters.into_iter().flatten() {
                match search_filter_matches(record, filter) {
                    Ok(true) => {}
                    Ok(false) => all = false,
                    Err(message) => {
                        let response = reply(
                            StatusCode::BAD_REQUEST,
                            json!({"status": "error", "message": message, "category": "VALIDATION_ERROR"}),
                        );
                        return inner.log(&method, &uri, response);
                    }
                }
            }
            any |= all;
        }
        if any {
            let mut properties = record.fields.clone();
            properties.insert("hs_object_id".into(), json!(record.id));
            properties.insert(
                "createdate".into(),
                json!((record.created * 1000).to_string()),
            );
            matched.push(json!({"id": record.id, "properties": properties, "archived": false}));
        }
    }
    let total = matched.len();
    matched.truncate(limit);
    let response = reply(StatusCode::OK, json!({"total": total, "results": matched}));
    inner.log(&method, &uri, response)
}

fn search_filter_matches(record: &Record, filter: &Value) -> Result<bool, String> {
    let property = filter
        .get("propertyName")
        .and_then(Value::as_str)
        .ok_or("a filter needs propertyName")?;
    let operator = filter
        .get("operator")
        .and_then(Value::as_str)
        .ok_or("a filter needs operator")?;
    let wanted = filter.get("value").map(text).unwrap_or_default();
    let actual = if property == "createdate" {
        Some((record.created * 1000).to_string())
    } else if property == "hs_object_id" {
        Some(record.id.clone())
    } else {
        record.fields.get(property).map(text)
    };
    let number = |v: &str| v.parse::<f64>().ok();
    let compare = |ordering: fn(f64, f64) -> bool| -> Result<bool, String> {
        let wanted = number(&wanted).ok_or(format!("{property}: {wanted:?} is not a number"))?;
        Ok(actual
            .as_deref()
            .and_then(number)
            .is_some_and(|a| ordering(a, wanted)))
    };
    match operator {
        "EQ" => Ok(actual.is_some_and(|a| a.eq_ignore_ascii_case(&wanted))),
        "NEQ" => Ok(!actual.is_some_and(|a| a.eq_ignore_ascii_case(&wanted))),
        "GT" => compare(|a, b| a > b),
        "GTE" => compare(|a, b| a >= b),
        "LT" => compare(|a, b| a < b),
        "LTE" => compare(|a, b| a <= b),
        other => Err(format!("operator {other} is not supported here")),
    }
}

/// `PATCH .../sobjects/{sObject}/{id}`: 204 without a body; 404 `NOT_FOUND` for an unknown id.
async fn salesforce_update(
    State(standin): State<Standin>,
    Path((_version, sobject, id)): Path<(String, String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Salesforce, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let mut inner = standin.lock();
    let found = inner.records.iter_mut().find(|r| {
        r.provider == "salesforce" && r.object == sobject && r.id == id && r.account == account
    });
    let response = match found {
        Some(record) => {
            record.fields.extend(object_body(&body));
            record.updates += 1;
            StatusCode::NO_CONTENT.into_response()
        }
        None => reply(
            StatusCode::NOT_FOUND,
            json!([{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]),
        ),
    };
    inner.log(&method, &uri, response)
}

/// `POST /crm/v3/objects/companies`: 201 with the company, as a contact's create answers.
async fn hubspot_create_company(
    State(standin): State<Standin>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Hubspot, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let mut inner = standin.lock();
    let response = inner.create_hubspot("companies", properties(&body), account);
    inner.log(&method, &uri, response)
}

/// `PUT /crm/v4/objects/contact/{id}/associations/default/company/{id}`: the default
/// (unlabeled) association, kept on the contact as `associatedcompanyid`. Doing it again
/// changes nothing. 404 when either record is not the account's.
async fn hubspot_associate(
    State(standin): State<Standin>,
    Path((contact_id, company_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Hubspot, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let mut inner = standin.lock();
    let is = |r: &Record, object: &str, id: &str| {
        r.provider == "hubspot" && r.object == object && r.id == id && r.account == account
    };
    let company_exists = inner
        .records
        .iter()
        .any(|r| is(r, "companies", &company_id));
    let contact = inner
        .records
        .iter_mut()
        .find(|r| is(r, "contacts", &contact_id));
    let response = match contact {
        Some(contact) if company_exists => {
            contact
                .fields
                .insert("associatedcompanyid".into(), json!(company_id));
            reply(
                StatusCode::OK,
                json!({"status": "COMPLETE", "results": [
                    {"from": {"id": contact_id}, "to": {"id": company_id},
                     "associationSpec": {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 279}},
                    {"from": {"id": company_id}, "to": {"id": contact_id},
                     "associationSpec": {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 280}}
                ]}),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"status": "error", "message": "resource not found", "category": "OBJECT_NOT_FOUND"}),
        ),
    };
    inner.log(&method, &uri, response)
}

async fn hubspot_update(
    State(standin): State<Standin>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Hubspot, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let mut inner = standin.lock();
    let found = inner
        .records
        .iter_mut()
        .find(|r| r.provider == "hubspot" && r.id == id && r.account == account);
    let response = match found {
        Some(record) => {
            record.fields.extend(properties(&body));
            record.updates += 1;
            reply(StatusCode::OK, contact(record, false))
        }
        None => reply(
            StatusCode::NOT_FOUND,
            json!({"status": "error", "message": "resource not found", "category": "OBJECT_NOT_FOUND"}),
        ),
    };
    inner.log(&method, &uri, response)
}

/// `POST /crm/v3/objects/contacts/batch/{create,update,upsert}`, at most 100 inputs. Inputs
/// carrying an `objectWriteTraceId` get multi-status answers: each input succeeds or fails
/// alone, its error naming its trace id under `context.objectWriteTraceId`, and the answer is
/// 207 when any failed (else 201 for create, 200 otherwise); results echo the trace id.
/// Without trace ids, one bad input fails the whole batch and nothing is written.
async fn hubspot_batch(
    State(standin): State<Standin>,
    Path(verb): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Hubspot, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let inputs = body
        .get("inputs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut inner = standin.lock();
    if !["create", "update", "upsert"].contains(&verb.as_str()) {
        let response = reply(
            StatusCode::NOT_FOUND,
            json!({"status": "error", "message": "resource not found", "category": "OBJECT_NOT_FOUND"}),
        );
        return inner.log(&method, &uri, response);
    }
    if inputs.len() > 100 {
        let response = reply(
            StatusCode::BAD_REQUEST,
            json!({"status": "error", "message": format!("Batch input limit exceeded: {} inputs, at most 100", inputs.len()), "category": "VALIDATION_ERROR"}),
        );
        return inner.log(&method, &uri, response);
    }
    if verb != "create"
        && let Some(duplicate) = duplicate_id(&inputs)
    {
        let response = reply(
            StatusCode::BAD_REQUEST,
            json!({"status": "error", "message": format!("Duplicate IDs found in batch input: [{duplicate}]. IDs must be unique"), "category": "VALIDATION_ERROR"}),
        );
        return inner.log(&method, &uri, response);
    }
    let traced = inputs.iter().all(|i| i.get("objectWriteTraceId").is_some());
    if !traced
        && let Some((status, error)) = inputs
            .iter()
            .find_map(|input| inner.batch_refusal(&verb, &account, input))
    {
        return inner.log(&method, &uri, reply(status, error));
    }
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for input in &inputs {
        let trace = input.get("objectWriteTraceId").cloned();
        if let Some((_, mut error)) = inner.batch_refusal(&verb, &account, input) {
            error["context"] = json!({"objectWriteTraceId": [trace]});
            errors.push(error);
            continue;
        }
        let mut result = inner.batch_write(&verb, &account, input);
        if let Some(trace) = trace {
            result["objectWriteTraceId"] = trace;
        }
        results.push(result);
    }
    let status = if !errors.is_empty() {
        StatusCode::MULTI_STATUS
    } else if verb == "create" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut answer = json!({"status": "COMPLETE", "results": results});
    if !errors.is_empty() {
        answer["numErrors"] = json!(errors.len());
        answer["errors"] = json!(errors);
    }
    inner.log(&method, &uri, reply(status, answer))
}

/// The first id two inputs of an update or upsert share: HubSpot refuses such a batch whole.
fn duplicate_id(inputs: &[Value]) -> Option<String> {
    let mut seen = HashSet::new();
    inputs
        .iter()
        .filter_map(|input| input.get("id").map(text))
        .find(|id| !seen.insert(id.clone()))
}

impl Inner {
    /// Why HubSpot refuses one batch input, with the status a batch of it alone would get.
    fn batch_refusal(
        &mut self,
        verb: &str,
        account: &Option<String>,
        input: &Value,
    ) -> Option<(StatusCode, Value)> {
        let fields = properties(input);
        if let Some(email) = fields.get("email").map(text)
            && !email.contains('@')
        {
            return Some((
                StatusCode::BAD_REQUEST,
                json!({"status": "error", "message": format!("Property values were not valid: email {email:?} is not a valid email address"), "category": "VALIDATION_ERROR"}),
            ));
        }
        let id = input.get("id").map(text).unwrap_or_default();
        match verb {
            "create" => {
                let email = fields.get("email").map(text)?;
                let existing = self.find(account, "hubspot", "contacts", "email", &email)?;
                Some((
                    StatusCode::CONFLICT,
                    json!({"status": "error", "message": format!("Contact already exists. Existing ID: {}", existing.id), "category": "CONFLICT"}),
                ))
            }
            "update" => {
                let exists = self.records.iter().any(|r| {
                    r.provider == "hubspot"
                        && r.object == "contacts"
                        && r.id == id
                        && r.account == *account
                });
                (!exists).then(|| {
                    (
                        StatusCode::NOT_FOUND,
                        json!({"status": "error", "message": format!("Object {id} not found"), "category": "OBJECT_NOT_FOUND"}),
                    )
                })
            }
            _ => None,
        }
    }

    /// Writes one accepted batch input and returns its result.
    fn batch_write(&mut self, verb: &str, account: &Option<String>, input: &Value) -> Value {
        let fields = properties(input);
        let id = input.get("id").map(text).unwrap_or_default();
        let id_property = match verb {
            "update" => "hs_object_id".to_owned(),
            _ => input
                .get("idProperty")
                .map(text)
                .unwrap_or_else(|| "email".into()),
        };
        if verb != "create" {
            let found = if verb == "update" {
                self.records.iter_mut().find(|r| {
                    r.provider == "hubspot"
                        && r.object == "contacts"
                        && r.id == id
                        && r.account == *account
                })
            } else {
                self.find(account, "hubspot", "contacts", &id_property, &id)
            };
            if let Some(record) = found {
                record.fields.extend(fields);
                record.updates += 1;
                return contact(record, false);
            }
        }
        let mut fields = fields;
        if verb == "upsert" {
            fields.insert(id_property, Value::String(id));
        }
        let record = Record {
            provider: "hubspot".into(),
            object: "contacts".into(),
            id: self.new_id(""),
            fields,
            creates: 1,
            updates: 0,
            account: account.clone(),
            created: 0,
        };
        let result = contact(&record, true);
        self.keep(record);
        result
    }
}

/// sObject Collections: `POST /services/data/{v}/composite/sobjects` creates, `PATCH
/// .../composite/sobjects/{sObject}/{externalIdField}` upserts, at most 200 records, each
/// with `attributes.type`. The answer is an array in the order of the records:
/// `{"id", "success", "errors": [{"statusCode", "message", "fields"}]}` (`created` for an
/// upsert). With `allOrNone: false` each record stands alone; with `true` one failure
/// writes nothing.
async fn salesforce_collection(
    State(standin): State<Standin>,
    Path(params): Path<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = standin
        .gate(Provider::Salesforce, &method, &uri, &headers)
        .await
    {
        return answer;
    }
    let account = standin.account_of(&headers);
    let records = body
        .get("records")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let all_or_none = body.get("allOrNone").and_then(Value::as_bool) == Some(true);
    let external_id = params.get("field").cloned();
    let mut inner = standin.lock();
    if records.len() > 200 {
        let response = reply(
            StatusCode::BAD_REQUEST,
            json!([{"message": "Maximum number of records is 200", "errorCode": "EXCEEDED_ID_LIMIT"}]),
        );
        return inner.log(&method, &uri, response);
    }
    let mut refusals: Vec<Option<Value>> = records
        .iter()
        .map(|record| collection_refusal(record, external_id.as_deref()))
        .collect();
    // Records sharing an external id are neither inserted nor updated.
    if let Some(field) = &external_id {
        let value_of = |record: &Value| record.get(field).map(text);
        for (index, record) in records.iter().enumerate() {
            let Some(value) = value_of(record) else {
                continue;
            };
            let shared = records
                .iter()
                .enumerate()
                .any(|(other, r)| other != index && value_of(r).as_deref() == Some(value.as_str()));
            if shared && refusals[index].is_none() {
                refusals[index] = Some(
                    json!({"statusCode": "DUPLICATE_VALUE", "message": format!("Duplicate external id specified: {value}"), "fields": [field]}),
                );
            }
        }
    }
    if all_or_none && refusals.iter().any(Option::is_some) {
        let answers: Vec<Value> = refusals
            .into_iter()
            .map(|refusal| {
                let error = refusal.unwrap_or_else(|| json!({"statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK", "message": "Record rolled back because not all records were valid and the request was using AllOrNone header", "fields": []}));
                json!({"success": false, "errors": [error]})
            })
            .collect();
        return inner.log(&method, &uri, reply(StatusCode::OK, json!(answers)));
    }
    let mut answers = Vec::new();
    for (record, refusal) in records.into_iter().zip(refusals) {
        if let Some(error) = refusal {
            answers.push(json!({"success": false, "errors": [error]}));
            continue;
        }
        let sobject = record["attributes"]["type"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut fields = object_body(&record);
        fields.remove("attributes");
        if let Some(field) = &external_id {
            let value = fields.get(field).map(text).unwrap_or_default();
            if let Some(existing) = inner.find(&account, "salesforce", &sobject, field, &value) {
                existing.fields.extend(fields);
                existing.updates += 1;
                answers.push(
                    json!({"id": existing.id, "success": true, "errors": [], "created": false}),
                );
                continue;
            }
        }
        let id = inner.new_id("003");
        inner.keep(Record {
            provider: "salesforce".into(),
            object: sobject,
            id: id.clone(),
            fields,
            creates: 1,
            updates: 0,
            account: account.clone(),
            created: 0,
        });
        let mut answer = json!({"id": id, "success": true, "errors": []});
        if external_id.is_some() {
            answer["created"] = json!(true);
        }
        answers.push(answer);
    }
    inner.log(&method, &uri, reply(StatusCode::OK, json!(answers)))
}

/// Why Salesforce refuses one record of a collection.
fn collection_refusal(record: &Value, external_id: Option<&str>) -> Option<Value> {
    let Some(sobject) = record
        .get("attributes")
        .and_then(|a| a.get("type"))
        .and_then(Value::as_str)
    else {
        return Some(
            json!({"statusCode": "INVALID_TYPE", "message": "Each record must have attributes.type", "fields": []}),
        );
    };
    if let Some(field) = external_id
        && record.get(field).is_none_or(Value::is_null)
    {
        return Some(
            json!({"statusCode": "MISSING_ARGUMENT", "message": format!("{field} not specified"), "fields": [field]}),
        );
    }
    if sobject == "Contact" && record.get("LastName").is_none_or(Value::is_null) {
        return Some(
            json!({"statusCode": "REQUIRED_FIELD_MISSING", "message": "Required fields are missing: [LastName]", "fields": ["LastName"]}),
        );
    }
    None
}

async fn token(
    State(standin): State<Standin>,
    method: Method,
    uri: Uri,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let mut inner = standin.lock();
    let refresh = form.get("refresh_token").cloned().unwrap_or_default();
    if form.get("grant_type").map(String::as_str) != Some("refresh_token")
        || !inner.valid_refresh.contains(&refresh)
    {
        let response = reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "expired access/refresh token"}),
        );
        return inner.log(&method, &uri, response);
    }
    inner.issued += 1;
    let access = format!("standin-access-{}", inner.issued);
    if let Some(valid) = &mut inner.valid_access {
        valid.insert(access.clone());
    }
    let mut body = json!({"access_token": access, "token_type": "Bearer", "expires_in": 1800});
    if inner.rotate_refresh {
        let rotated = format!("standin-refresh-{}", inner.issued);
        inner.valid_refresh.remove(&refresh);
        inner.valid_refresh.insert(rotated.clone());
        body["refresh_token"] = json!(rotated);
    }
    inner.log(&method, &uri, reply(StatusCode::OK, body))
}

async fn hook(
    State(standin): State<Standin>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(answer) = standin.gate(Provider::Http, &method, &uri, &headers).await {
        return answer;
    }
    let account = None;
    let mut inner = standin.lock();
    let id = inner.new_id("");
    let fields = serde_json::from_slice::<Value>(&body)
        .ok()
        .map(|b| object_body(&b))
        .unwrap_or_default();
    inner.keep(Record {
        provider: "http".into(),
        object: uri.path().to_owned(),
        id: id.clone(),
        fields,
        creates: 1,
        updates: 0,
        account: account.clone(),
        created: 0,
    });
    inner.log(&method, &uri, reply(StatusCode::OK, json!({"id": id})))
}

async fn records(State(standin): State<Standin>) -> Json<Vec<Record>> {
    Json(standin.records())
}

async fn requests(State(standin): State<Standin>) -> Json<Vec<LoggedRequest>> {
    Json(standin.requests())
}

async fn set_faults(State(standin): State<Standin>, Json(faults): Json<Faults>) -> StatusCode {
    standin.set_faults(faults);
    StatusCode::NO_CONTENT
}

async fn set_oauth(
    State(standin): State<Standin>,
    Json(settings): Json<oauth::OAuthSettings>,
) -> StatusCode {
    standin.set_oauth(settings);
    StatusCode::NO_CONTENT
}

async fn set_tokens(State(standin): State<Standin>, Json(tokens): Json<Tokens>) -> StatusCode {
    standin.set_tokens(tokens);
    StatusCode::NO_CONTENT
}

async fn reset(State(standin): State<Standin>) -> StatusCode {
    let mut inner = standin.lock();
    let forget = inner.forget;
    *inner = Inner {
        forget,
        ..Inner::default()
    };
    StatusCode::NO_CONTENT
}

async fn set_limits(
    State(standin): State<Standin>,
    Json(settings): Json<limits::LimitSettings>,
) -> StatusCode {
    standin.set_limits(settings);
    StatusCode::NO_CONTENT
}

async fn limit_counts(State(standin): State<Standin>) -> Json<limits::LimitCounts> {
    Json(standin.lock().limits.counts())
}
