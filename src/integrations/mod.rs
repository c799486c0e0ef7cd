//! Integration steps: what a workflow does in the user's connected account.
//!
//! A step is built as a [`PreparedRequest`] (what a dry run prints), sent by [`Integrations`],
//! and its response interpreted by the provider's module. Failures are classified by
//! [`classify`]; this layer makes one attempt and never retries.

pub mod batch_api;
pub(crate) mod classify;
pub mod connect;
pub(crate) mod http_request;
pub(crate) mod hubspot;
pub mod limits;
pub(crate) mod oauth;
pub(crate) mod outbound;
pub(crate) mod salesforce;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use time::OffsetDateTime;

use crate::config::{HttpSettings, SalesforceSettings};
use crate::core::connection::Connection;
use crate::core::failure::{Failure, FailureKind};
use crate::core::mapping::{Scope, TextTemplate};
use crate::core::provider::Provider;

/// The step a workflow runs, parsed from its provider, action name and options.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// POST a new record of any sObject. `match_fields`: the mapped fields that identify the
    /// record, looked up (SOQL) before a run that may have created it already runs again.
    SalesforceCreate {
        sobject: String,
        match_fields: Vec<String>,
    },
    /// PATCH by external id: creates or updates; the id value is the mapped field of that name.
    SalesforceUpsert {
        sobject: String,
        external_id_field: String,
    },
    /// SOQL, whose references render as escaped literals; the answer (`totalSize`,
    /// `records`) is the output. Reads only.
    SalesforceQuery { soql: TextTemplate },
    /// PATCH a record by its id (a text template, typically an earlier step's output).
    SalesforceUpdate { sobject: String, id: TextTemplate },
    /// POST a contact; `409 CONTACT_EXISTS` becomes an update of the existing id.
    HubspotCreateContact,
    /// `POST .../contacts/search`, the mapping as the search body. Reads only.
    HubspotSearchContacts,
    /// PATCH a contact by id, the mapping as its properties.
    HubspotUpdateContact { id: TextTemplate },
    /// POST a company, the mapping as its properties. `match_property`: the property that
    /// identifies the company (`domain` when not given), searched for before a run that may
    /// have created it already runs again.
    HubspotCreateCompany { match_property: Option<String> },
    /// The default (v4, unlabeled) association of a contact with a company.
    HubspotAssociate {
        contact_id: TextTemplate,
        company_id: TextTemplate,
    },
    /// `batch/upsert` with `idProperty` (email by default).
    HubspotUpsertContact { id_property: String },
    /// Any HTTP call; URL and header values are text templates, the mapping is the body.
    HttpRequest {
        method: Method,
        url: TextTemplate,
        headers: Vec<(String, TextTemplate)>,
        auth: HttpAuth,
    },
}

/// The name of an HTTP request step in a Salesforce or HubSpot workflow.
pub const HTTP_STEP: &str = "http.request";

/// What of the workflow's connection an HTTP step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpAuth {
    /// An http workflow's `request`: a relative URL is joined to the connection's base URL,
    /// and its token is sent as a bearer token unless the step sets Authorization.
    Connection,
    /// `http.request` in a Salesforce or HubSpot workflow: the URL is absolute and only the
    /// step's own headers are sent; the CRM connection's base URL and token are never used.
    OwnHeaders,
}

const HTTP_STEP_OPTIONS: &str = "options: url (required; absolute, http:// or https://), method (default POST), headers (object); the CRM token is never sent";

/// The action names per provider, for help texts and errors.
pub const ACTIONS: &[(Provider, &str, &str)] = &[
    (
        Provider::Salesforce,
        "create",
        "options: sobject (default Contact), match_fields (mapped fields that identify a record, e.g. [\"Email\"])",
    ),
    (
        Provider::Salesforce,
        "upsert",
        "options: sobject (default Contact), external_id_field (required)",
    ),
    (
        Provider::Salesforce,
        "query",
        "options: soql (required; references render as escaped literals: WHERE Email = {{payload.email}})",
    ),
    (
        Provider::Salesforce,
        "update",
        "options: sobject (default Contact), id (required, e.g. {{steps.find.records.0.Id}})",
    ),
    (Provider::Hubspot, "create-contact", "no options"),
    (
        Provider::Hubspot,
        "search-contacts",
        "no options; the mapping is the search body (filterGroups, properties, limit)",
    ),
    (
        Provider::Hubspot,
        "update-contact",
        "options: id (required, e.g. {{steps.find.results.0.id}})",
    ),
    (
        Provider::Hubspot,
        "create-company",
        "options: match_property (the property that identifies a company; default domain, when mapped)",
    ),
    (
        Provider::Hubspot,
        "associate",
        "options: contact_id, company_id (both required): the default contact-company association",
    ),
    (
        Provider::Hubspot,
        "upsert-contact",
        "options: id_property (default email)",
    ),
    (Provider::Salesforce, HTTP_STEP, HTTP_STEP_OPTIONS),
    (Provider::Hubspot, HTTP_STEP, HTTP_STEP_OPTIONS),
    (
        Provider::Http,
        "request",
        "options: url (required; absolute, or a path joined to the connection's base URL), method (default POST), headers (object)",
    ),
];

impl Action {
    /// The option keys an action takes. An action's known name is checked by [`Action::parse`].
    fn option_keys(provider: Provider, action: &str) -> &'static [&'static str] {
        match (provider, action) {
            (Provider::Salesforce, "create") => &["sobject", "match_fields"],
            (Provider::Salesforce, "upsert") => &["sobject", "external_id_field"],
            (Provider::Salesforce, "query") => &["soql"],
            (Provider::Salesforce, "update") => &["sobject", "id"],
            (Provider::Hubspot, "upsert-contact") => &["id_property"],
            (Provider::Hubspot, "update-contact") => &["id"],
            (Provider::Hubspot, "associate") => &["contact_id", "company_id"],
            (Provider::Hubspot, "create-company") => &["match_property"],
            (Provider::Http, "request") | (Provider::Salesforce | Provider::Hubspot, HTTP_STEP) => {
                &["url", "method", "headers"]
            }
            _ => &[],
        }
    }

    /// Parses a definition as [`Action::parse`] does, and also refuses options the action
    /// does not take (an option of another action, a typo), so a definition stores nothing
    /// that would be silently ignored. Only definitions are held to this: a stored workflow
    /// still runs.
    pub fn parse_definition(
        provider: Provider,
        action: &str,
        options: &Value,
    ) -> Result<Action, String> {
        let parsed = Action::parse(provider, action, options)?;
        let allowed = Action::option_keys(provider, action);
        let unknown: Vec<&str> = options
            .as_object()
            .into_iter()
            .flat_map(|map| map.keys())
            .map(String::as_str)
            .filter(|key| !allowed.contains(key))
            .collect();
        if unknown.is_empty() {
            return Ok(parsed);
        }
        let takes = if allowed.is_empty() {
            "no options".to_owned()
        } else {
            format!("only {}", allowed.join(", "))
        };
        Err(format!(
            "{provider} {action} does not take option {}: it takes {takes}",
            unknown.join(", ")
        ))
    }

    pub fn parse(provider: Provider, action: &str, options: &Value) -> Result<Action, String> {
        let Some(options) = options.as_object() else {
            return Err("options must be a JSON object".into());
        };
        let text = |key: &str| -> Result<Option<String>, String> {
            match options.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
                Some(_) => Err(format!("option {key} must be a non-empty string")),
            }
        };
        let sobject = || -> Result<String, String> {
            let name = text("sobject")?.unwrap_or_else(|| "Contact".to_owned());
            check_api_name(&name, "sobject")?;
            Ok(name)
        };
        let template = |key: &str| -> Result<TextTemplate, String> {
            let source =
                text(key)?.ok_or_else(|| format!("{provider} {action} needs option {key}"))?;
            TextTemplate::compile(&source).map_err(|e| format!("option {key}: {e}"))
        };
        match (provider, action) {
            (Provider::Salesforce, "create") => Ok(Action::SalesforceCreate {
                sobject: sobject()?,
                match_fields: match_fields(options.get("match_fields"))?,
            }),
            (Provider::Salesforce, "upsert") => {
                let field = text("external_id_field")?
                    .ok_or("salesforce upsert needs option external_id_field")?;
                check_api_name(&field, "external_id_field")?;
                Ok(Action::SalesforceUpsert {
                    sobject: sobject()?,
                    external_id_field: field,
                })
            }
            (Provider::Salesforce, "query") => {
                let soql = template("soql")?;
                salesforce::check_query(&soql)?;
                Ok(Action::SalesforceQuery { soql })
            }
            (Provider::Salesforce, "update") => Ok(Action::SalesforceUpdate {
                sobject: sobject()?,
                id: template("id")?,
            }),
            (Provider::Hubspot, "create-contact") => Ok(Action::HubspotCreateContact),
            (Provider::Hubspot, "search-contacts") => Ok(Action::HubspotSearchContacts),
            (Provider::Hubspot, "update-contact") => Ok(Action::HubspotUpdateContact {
                id: template("id")?,
            }),
            (Provider::Hubspot, "create-company") => {
                let match_property = text("match_property")?;
                if let Some(property) = &match_property {
                    hubspot::check_property_name(property, "match_property")?;
                }
                Ok(Action::HubspotCreateCompany { match_property })
            }
            (Provider::Hubspot, "associate") => Ok(Action::HubspotAssociate {
                contact_id: template("contact_id")?,
                company_id: template("company_id")?,
            }),
            (Provider::Hubspot, "upsert-contact") => Ok(Action::HubspotUpsertContact {
                id_property: text("id_property")?.unwrap_or_else(|| "email".to_owned()),
            }),
            (Provider::Http, "request") => {
                http_request::parse_options(options, HttpAuth::Connection)
            }
            (Provider::Salesforce | Provider::Hubspot, HTTP_STEP) => {
                http_request::parse_options(options, HttpAuth::OwnHeaders)
            }
            (Provider::Http, HTTP_STEP) => Err(format!(
                "{HTTP_STEP} is an HTTP step in a salesforce or hubspot workflow; an http workflow's step is action request"
            )),
            (provider, action) => {
                let known: Vec<&str> = ACTIONS
                    .iter()
                    .filter(|(p, _, _)| *p == provider)
                    .map(|(_, a, _)| *a)
                    .collect();
                Err(format!(
                    "unknown action {action:?} for {provider}: expected {}",
                    known.join(" or ")
                ))
            }
        }
    }

    /// The options that are text templates, by name (`headers.NAME` for a header), so a
    /// definition can check what they reference.
    pub fn templates(&self) -> Vec<(String, &TextTemplate)> {
        match self {
            Action::HttpRequest { url, headers, .. } => {
                let mut out = vec![("url".to_owned(), url)];
                out.extend(
                    headers
                        .iter()
                        .map(|(name, t)| (format!("headers.{name}"), t)),
                );
                out
            }
            Action::SalesforceQuery { soql } => vec![("soql".to_owned(), soql)],
            Action::SalesforceUpdate { id, .. } | Action::HubspotUpdateContact { id } => {
                vec![("id".to_owned(), id)]
            }
            Action::HubspotAssociate {
                contact_id,
                company_id,
            } => vec![
                ("contact_id".to_owned(), contact_id),
                ("company_id".to_owned(), company_id),
            ],
            Action::SalesforceCreate { .. }
            | Action::SalesforceUpsert { .. }
            | Action::HubspotCreateContact
            | Action::HubspotSearchContacts
            | Action::HubspotUpsertContact { .. }
            | Action::HubspotCreateCompany { .. } => Vec::new(),
        }
    }

    /// The provider a step calls: its workflow's, except for an HTTP request.
    pub fn provider(&self, workflow: Provider) -> Provider {
        match self {
            Action::HttpRequest { .. } => Provider::Http,
            _ => workflow,
        }
    }

    /// Whether the step only reads (a dry run with `--send-reads` sends it).
    pub fn is_read_only(&self) -> bool {
        match self {
            Action::SalesforceQuery { .. } | Action::HubspotSearchContacts => true,
            Action::HttpRequest { method, .. } => *method == Method::GET,
            _ => false,
        }
    }

    /// Whether running the step again after an attempt that may have reached the provider
    /// has the effect of running it once, so a crash between the provider's answer and
    /// recording it cannot create a duplicate.
    pub fn is_idempotent(&self) -> bool {
        match self {
            Action::SalesforceUpsert { .. } | Action::HubspotUpsertContact { .. } => true,
            // Reads, and writes of a given id: the repeat changes nothing more.
            Action::SalesforceQuery { .. }
            | Action::SalesforceUpdate { .. }
            | Action::HubspotSearchContacts
            | Action::HubspotUpdateContact { .. }
            | Action::HubspotAssociate { .. } => true,
            // The company an earlier attempt made is searched for by its identifying
            // property, when the mapping gives it a value.
            Action::HubspotCreateCompany { .. } => true,
            // A second create meets 409 CONTACT_EXISTS and becomes an update.
            Action::HubspotCreateContact => true,
            // The record an earlier attempt made is looked up before creating another.
            Action::SalesforceCreate { match_fields, .. } => !match_fields.is_empty(),
            Action::HttpRequest { method, .. } => {
                matches!(*method, Method::PUT | Method::DELETE | Method::GET)
            }
        }
    }
}

/// `match_fields`: absent, or an array of Salesforce field API names.
fn match_fields(option: Option<&Value>) -> Result<Vec<String>, String> {
    let Some(option) = option.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let Some(items) = option.as_array() else {
        return Err("option match_fields must be an array of field names".into());
    };
    items
        .iter()
        .map(|item| {
            let name = item
                .as_str()
                .ok_or("option match_fields must be an array of field names")?;
            check_api_name(name, "match_fields entry")?;
            Ok(name.to_owned())
        })
        .collect()
}

fn check_api_name(name: &str, what: &str) -> Result<(), String> {
    let valid = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if valid {
        Ok(())
    } else {
        Err(format!("{what} {name:?} is not a Salesforce API name"))
    }
}

/// A request ready to go: what the dry run prints, and exactly what the worker sends.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, HeaderText)>,
    pub body: Option<Value>,
}

/// A header value; secret ones print masked.
#[derive(Clone)]
pub enum HeaderText {
    Plain(String),
    Secret(SecretString),
}

impl fmt::Debug for HeaderText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderText::Plain(text) => write!(f, "{text:?}"),
            HeaderText::Secret(_) => f.write_str("\"[redacted]\""),
        }
    }
}

impl HeaderText {
    pub fn masked(&self) -> String {
        match self {
            HeaderText::Plain(text) => text.clone(),
            HeaderText::Secret(secret) => mask(secret.expose_secret()),
        }
    }
}

/// Keeps a prefix such as "Bearer " and four characters, so a reader can tell which token
/// without seeing it.
fn mask(value: &str) -> String {
    let (prefix, token) = match value.split_once(' ') {
        Some((scheme, token)) => (format!("{scheme} "), token),
        None => (String::new(), value),
    };
    let shown: String = token.chars().take(4).collect();
    if token.chars().count() <= 8 {
        format!("{prefix}****")
    } else {
        format!("{prefix}{shown}****")
    }
}

impl PreparedRequest {
    pub fn new(method: Method, url: String) -> PreparedRequest {
        PreparedRequest {
            method,
            url,
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn bearer(mut self, token: Option<&SecretString>) -> PreparedRequest {
        if let Some(token) = token {
            self.headers.push((
                "authorization".into(),
                HeaderText::Secret(SecretString::from(format!(
                    "Bearer {}",
                    token.expose_secret()
                ))),
            ));
        }
        self
    }

    pub fn json(mut self, body: Value) -> PreparedRequest {
        self.body = Some(body);
        self
    }
}

/// A response, its body read up to the configured cap.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RawResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// An earlier attempt of the same run may have reached the provider (its worker died before
/// recording the outcome, or it failed without a clear answer): what it made is looked for
/// before anything is created again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Earlier {
    /// Nothing an earlier attempt made is older than this.
    pub since: OffsetDateTime,
}

/// What a successful step reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepOutput {
    /// The provider's id for what was created or updated.
    pub provider_id: Option<String>,
    pub status: u16,
    /// The provider's answer, parsed, when it was JSON: what later steps of a workflow read.
    pub body: Option<Value>,
}

impl StepOutput {
    /// What later steps read as `steps.NAME`: the provider's JSON answer when it is an
    /// object, else an object holding the provider's id (an answer without a body, a
    /// record found rather than created).
    pub fn output(&self) -> Value {
        match &self.body {
            Some(body @ Value::Object(_)) => body.clone(),
            _ => serde_json::json!({"id": self.provider_id}),
        }
    }
}

/// Whether a request counts among the calls to the connection's account, whose limit the
/// worker keeps ([`limits::record`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    Account,
    Elsewhere,
}

/// HTTP clients for the steps: one keep-alive pool for the CRMs and token endpoints, one
/// for generic HTTP steps (which has its own outbound rules).
#[derive(Clone)]
pub struct Integrations {
    crm: reqwest::Client,
    generic: reqwest::Client,
    outbound: Arc<outbound::Outbound>,
    max_response_bytes: usize,
    pub salesforce: SalesforceSettings,
}

/// Why the HTTP clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Client(#[from] reqwest::Error),
    #[error("{0}")]
    Allow(String),
    /// The process did not install rustls' crypto provider at start (`main` does).
    #[error("no TLS crypto provider is installed for this process")]
    NoCryptoProvider,
}

impl Integrations {
    pub fn new(
        http: &HttpSettings,
        salesforce: &SalesforceSettings,
    ) -> Result<Integrations, SetupError> {
        // The clients use the process-wide crypto provider, installed once at process start;
        // without it building them would panic.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            return Err(SetupError::NoCryptoProvider);
        }
        let outbound = Arc::new(outbound::Outbound::new(&http.allow).map_err(SetupError::Allow)?);
        let builder = || {
            reqwest::Client::builder()
                .timeout(http.timeout)
                .connect_timeout(http.connect_timeout)
                .pool_max_idle_per_host(http.pool_max_idle_per_host)
                .user_agent(http.user_agent.clone())
        };
        Ok(Integrations {
            // CRM APIs never redirect a write; a redirect would be a misconfigured base URL.
            crm: builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            generic: builder()
                .redirect(http_request::same_host_redirects())
                .dns_resolver(outbound.clone().resolver())
                .build()?,
            outbound,
            max_response_bytes: http.max_response_bytes,
            salesforce: salesforce.clone(),
        })
    }

    /// Builds the request `action` sends for this rendered body, without sending it.
    pub fn prepare(
        &self,
        action: &Action,
        connection: &Connection,
        body: Value,
        scope: &Scope<'_>,
    ) -> Result<PreparedRequest, Failure> {
        match action {
            Action::SalesforceCreate { sobject, .. } => Ok(salesforce::create(
                &self.salesforce,
                connection,
                sobject,
                body,
            )),
            Action::SalesforceUpsert {
                sobject,
                external_id_field,
            } => salesforce::upsert(
                &self.salesforce,
                connection,
                sobject,
                external_id_field,
                body,
            ),
            Action::SalesforceQuery { soql } => Ok(salesforce::query(
                &self.salesforce,
                connection,
                &soql.render_literals(scope, salesforce::soql_value),
            )),
            Action::SalesforceUpdate { sobject, id } => salesforce::update(
                &self.salesforce,
                connection,
                sobject,
                &rendered_id(id, scope, "id")?,
                body,
            ),
            Action::HubspotCreateContact => Ok(hubspot::create_contact(connection, body)),
            Action::HubspotSearchContacts => Ok(hubspot::search_contacts(connection, body)),
            Action::HubspotUpdateContact { id } => Ok(hubspot::update_contact(
                connection,
                &rendered_id(id, scope, "id")?,
                Some(serde_json::json!({ "properties": body })),
            )),
            Action::HubspotCreateCompany { .. } => Ok(hubspot::create_company(connection, body)),
            Action::HubspotAssociate {
                contact_id,
                company_id,
            } => Ok(hubspot::associate(
                connection,
                &rendered_id(contact_id, scope, "contact_id")?,
                &rendered_id(company_id, scope, "company_id")?,
            )),
            Action::HubspotUpsertContact { id_property } => {
                hubspot::upsert_contact(connection, id_property, body)
            }
            Action::HttpRequest {
                method,
                url,
                headers,
                auth,
            } => http_request::prepare(connection, method, url, headers, *auth, body, scope),
        }
    }

    /// One attempt of the step: send, interpret, and follow up where the provider's answer
    /// calls for it (HubSpot's 409 becomes an update). After an `earlier` attempt, a
    /// Salesforce create, a HubSpot create-contact or create-company first looks for the
    /// record that attempt made.
    pub async fn execute(
        &self,
        action: &Action,
        connection: &Connection,
        body: Value,
        scope: &Scope<'_>,
        earlier: Option<Earlier>,
    ) -> Result<StepOutput, Failure> {
        let request = self.prepare(action, connection, body, scope)?;
        match action {
            Action::SalesforceCreate {
                sobject,
                match_fields,
            } => {
                if let Some(earlier) = earlier
                    && !match_fields.is_empty()
                {
                    let query = salesforce::find_created(
                        &self.salesforce,
                        connection,
                        sobject,
                        match_fields,
                        request.body.as_ref(),
                        earlier.since,
                    );
                    let found = self.send(&query, Provider::Salesforce, &[]).await?;
                    if let Some(output) = salesforce::interpret_found(&found) {
                        tracing::info!(
                            provider_id = output.provider_id.as_deref(),
                            "found the record an earlier attempt created; not creating another"
                        );
                        return Ok(output);
                    }
                }
                let response = self.send(&request, Provider::Salesforce, &[400]).await?;
                if response.status != 400 {
                    return salesforce::interpret(&response);
                }
                // A duplicate rule matched: after an earlier attempt, the match is most likely
                // what that attempt created.
                match (earlier, salesforce::duplicate_of(&response)) {
                    (Some(_), Some(id)) => {
                        tracing::info!(provider_id = %id, "a duplicate rule matched after an earlier attempt; taking the match as the outcome");
                        Ok(StepOutput {
                            provider_id: Some(id),
                            status: response.status,
                            body: None,
                        })
                    }
                    _ => Err(classify::response(
                        Provider::Salesforce,
                        response.status,
                        &response.headers,
                        &response.body,
                    )),
                }
            }
            Action::SalesforceUpsert { .. } => {
                let response = self.send(&request, Provider::Salesforce, &[]).await?;
                salesforce::interpret(&response)
            }
            Action::HubspotCreateContact => {
                // After an earlier attempt, the contact it may have made is looked for by
                // email first. HubSpot's search can lag a fresh create by seconds, and has a
                // rate limit of its own: a contact it misses, or a search that fails, leaves
                // the create below, whose 409 makes it an update, never a second contact.
                if let Some(search) = earlier.and_then(|earlier| {
                    hubspot::find_created(
                        connection,
                        hubspot::Object::Contacts,
                        "email",
                        request.body.as_ref(),
                        earlier.since,
                    )
                }) {
                    match self.send(&search, Provider::Hubspot, &[]).await {
                        Ok(found) => {
                            if let Some(output) = hubspot::interpret_found(&found) {
                                tracing::info!(
                                    provider_id = output.provider_id.as_deref(),
                                    "found the contact an earlier attempt created; not creating another"
                                );
                                return Ok(output);
                            }
                        }
                        Err(failure) => {
                            tracing::warn!(error = %failure.message, "the search for an earlier attempt's contact failed; creating, a conflict names it")
                        }
                    }
                }
                let response = self.send(&request, Provider::Hubspot, &[409]).await?;
                let Some(existing) = hubspot::existing_contact_id(&response) else {
                    return hubspot::interpret_create(&response);
                };
                self.update_existing_contact(connection, existing, request.body)
                    .await
            }
            Action::HubspotUpsertContact { .. } => {
                let response = self.send(&request, Provider::Hubspot, &[]).await?;
                hubspot::interpret_upsert(&response)
            }
            Action::SalesforceQuery { .. } | Action::SalesforceUpdate { .. } => {
                let response = self.send(&request, Provider::Salesforce, &[]).await?;
                Ok(answer(&response, request_id(action, scope)))
            }
            Action::HubspotCreateCompany { match_property } => {
                // After an earlier attempt, the company it may have made is searched for by
                // its identifying property first. A company's create has no conflict to fall
                // back on, so a search that fails fails this attempt (it is retried) rather
                // than risk a second company.
                let property = match_property
                    .as_deref()
                    .unwrap_or(hubspot::COMPANY_MATCH_PROPERTY);
                if let Some(search) = earlier.and_then(|earlier| {
                    hubspot::find_created(
                        connection,
                        hubspot::Object::Companies,
                        property,
                        request.body.as_ref(),
                        earlier.since,
                    )
                }) {
                    let found = self.send(&search, Provider::Hubspot, &[]).await?;
                    if let Some(output) = hubspot::interpret_found(&found) {
                        tracing::info!(
                            provider_id = output.provider_id.as_deref(),
                            "found the company an earlier attempt created; not creating another"
                        );
                        return Ok(output);
                    }
                }
                let response = self.send(&request, Provider::Hubspot, &[]).await?;
                Ok(answer(&response, None))
            }
            Action::HubspotSearchContacts
            | Action::HubspotUpdateContact { .. }
            | Action::HubspotAssociate { .. } => {
                let response = self.send(&request, Provider::Hubspot, &[]).await?;
                Ok(answer(&response, request_id(action, scope)))
            }
            Action::HttpRequest { auth, .. } => {
                // A CRM workflow's HTTP request is not a call to the connection's account:
                // it is not counted toward the account's limit.
                let counted = match auth {
                    HttpAuth::Connection => Counted::Account,
                    HttpAuth::OwnHeaders => Counted::Elsewhere,
                };
                let response = self
                    .send_counted(&request, Provider::Http, &[], counted)
                    .await
                    .map_err(|failure| http_request::failure_of(*auth, failure))?;
                Ok(http_request::interpret(&response))
            }
        }
    }

    /// What a HubSpot create does when the contact exists: `body` (the create's, with its
    /// `properties`) sent as an update of `existing`.
    pub async fn update_existing_contact(
        &self,
        connection: &Connection,
        existing: String,
        body: Option<Value>,
    ) -> Result<StepOutput, Failure> {
        let update = hubspot::update_contact(connection, &existing, body);
        let updated = self.send(&update, Provider::Hubspot, &[]).await?;
        Ok(StepOutput {
            provider_id: Some(existing),
            status: updated.status,
            body: None,
        })
    }

    /// Sends a prepared request. A non-2xx answer is classified into a [`Failure`], except
    /// the statuses in `answers` that the step handles itself.
    pub async fn send(
        &self,
        request: &PreparedRequest,
        provider: Provider,
        answers: &[u16],
    ) -> Result<RawResponse, Failure> {
        self.send_counted(request, provider, answers, Counted::Account)
            .await
    }

    async fn send_counted(
        &self,
        request: &PreparedRequest,
        provider: Provider,
        answers: &[u16],
        counted: Counted,
    ) -> Result<RawResponse, Failure> {
        let response = self.exchange(request, provider, counted).await?;
        if response.is_success() || answers.contains(&response.status) {
            return Ok(response);
        }
        Err(classify::response(
            provider,
            response.status,
            &response.headers,
            &response.body,
        ))
    }

    /// Sends and reads the response whatever its status.
    pub async fn send_raw(
        &self,
        request: &PreparedRequest,
        provider: Provider,
    ) -> Result<RawResponse, Failure> {
        self.exchange(request, provider, Counted::Account).await
    }

    async fn exchange(
        &self,
        request: &PreparedRequest,
        provider: Provider,
        counted: Counted,
    ) -> Result<RawResponse, Failure> {
        let client = match provider {
            Provider::Http => {
                self.outbound.check(&request.url).await?;
                &self.generic
            }
            Provider::Salesforce | Provider::Hubspot => &self.crm,
        };
        let mut builder = client.request(request.method.clone(), &request.url);
        for (name, value) in &request.headers {
            builder = match value {
                HeaderText::Plain(text) => builder.header(name, text),
                HeaderText::Secret(secret) => builder.header(name, secret.expose_secret()),
            };
        }
        if let Some(body) = &request.body {
            builder = builder.json(body);
        }
        let response = builder.send().await.map_err(|e| classify::transport(&e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        if counted == Counted::Account {
            limits::record(provider, &headers);
        }
        let body = read_capped(response, self.max_response_bytes).await?;
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// The token endpoint client (same pool as the CRMs).
    pub(crate) fn crm_client(&self) -> &reqwest::Client {
        &self.crm
    }

    pub(crate) fn max_response_bytes(&self) -> usize {
        self.max_response_bytes
    }
}

/// The text of the mapped field that identifies a record (an upsert's id property or
/// external id): a non-empty string or a number; `Err` names the field and carries `code`.
pub(crate) fn identifying_value(
    fields: &Value,
    field: &str,
    what: &str,
    code: &str,
) -> Result<String, Failure> {
    fields
        .get(field)
        .and_then(|value| match value {
            Value::String(text) if !text.is_empty() => Some(text.clone()),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        })
        .ok_or_else(|| {
            Failure::new(
                FailureKind::Permanent,
                format!("the mapping gave no value for the {what} {field}"),
            )
            .with_code(code)
        })
}

#[cfg(test)]
pub(crate) fn test_response(status: u16, body: &str) -> RawResponse {
    RawResponse {
        status,
        headers: HeaderMap::new(),
        body: Bytes::from(body.to_owned()),
    }
}

/// An id rendered from a step's option: present and free of anything that could change the
/// URL's path (it is percent-encoded as one segment besides).
fn rendered_id(
    template: &TextTemplate,
    scope: &Scope<'_>,
    option: &str,
) -> Result<String, Failure> {
    let id = template.render_with(scope, str::to_owned);
    let id = id.trim();
    if id.is_empty() {
        return Err(Failure::new(
            FailureKind::Permanent,
            format!("option {option} rendered empty: the record to act on is not known"),
        ));
    }
    Ok(id.to_owned())
}

/// The id an action acts on, when it names one (an update).
fn request_id(action: &Action, scope: &Scope<'_>) -> Option<String> {
    match action {
        Action::SalesforceUpdate { id, .. } | Action::HubspotUpdateContact { id } => {
            Some(id.render_with(scope, str::to_owned).trim().to_owned())
        }
        _ => None,
    }
}

/// A 2xx answer as the step's output: its JSON body, and the id it names or `id`.
fn answer(response: &RawResponse, id: Option<String>) -> StepOutput {
    let body = response.json();
    let named = body.as_ref().and_then(|b| match b.get("id")? {
        Value::String(id) => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    });
    StepOutput {
        provider_id: named.or(id),
        status: response.status,
        body,
    }
}

/// Reads at most `cap` bytes of the body. A longer body is cut: a success stays a success
/// (its effect happened), an error keeps enough text to be classified.
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Bytes, Failure> {
    let mut body = Vec::new();
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            Failure::new(
                FailureKind::Transient,
                format!("reading the response failed: {e}"),
            )
        })?;
        let Some(chunk) = chunk else { break };
        let room = cap.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= cap {
            break;
        }
    }
    Ok(Bytes::from(body))
}

/// Joins a connection's base URL and a path, with exactly one slash between.
pub fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Everything but RFC 3986's unreserved characters is encoded in a path segment.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one URL path segment.
pub fn encode_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_definition_with_an_option_of_another_action_is_refused() {
        let err = Action::parse_definition(
            Provider::Salesforce,
            "create",
            &json!({"id_property": "email"}),
        )
        .expect_err("refused");
        assert_eq!(
            err,
            "salesforce create does not take option id_property: it takes only sobject, match_fields"
        );
        let err = Action::parse_definition(
            Provider::Hubspot,
            "create-contact",
            &json!({"sobject": "Lead"}),
        )
        .expect_err("refused");
        assert!(err.ends_with("it takes no options"), "{err}");
        assert!(
            Action::parse_definition(
                Provider::Salesforce,
                "upsert",
                &json!({"sobject": "Lead", "external_id_field": "Ext__c"})
            )
            .is_ok()
        );
        // What is stored already still runs.
        assert!(
            Action::parse(Provider::Salesforce, "create", &json!({"id_property": "x"})).is_ok()
        );
    }

    #[test]
    fn actions_parse_with_their_options() {
        assert_eq!(
            Action::parse(Provider::Salesforce, "create", &json!({})),
            Ok(Action::SalesforceCreate {
                sobject: "Contact".into(),
                match_fields: vec![],
            })
        );
        assert_eq!(
            Action::parse(
                Provider::Salesforce,
                "create",
                &json!({"match_fields": ["Email", "LastName"]})
            ),
            Ok(Action::SalesforceCreate {
                sobject: "Contact".into(),
                match_fields: vec!["Email".into(), "LastName".into()],
            })
        );
        assert!(
            Action::parse(
                Provider::Salesforce,
                "create",
                &json!({"match_fields": "Email"})
            )
            .is_err()
        );
        assert!(
            Action::parse(
                Provider::Salesforce,
                "create",
                &json!({"match_fields": ["Email' OR Id != null"]})
            )
            .is_err(),
            "only API names, nothing that could change the query"
        );
        assert_eq!(
            Action::parse(
                Provider::Salesforce,
                "upsert",
                &json!({"sobject": "Lead", "external_id_field": "Ext_Id__c"})
            ),
            Ok(Action::SalesforceUpsert {
                sobject: "Lead".into(),
                external_id_field: "Ext_Id__c".into()
            })
        );
        assert!(Action::parse(Provider::Salesforce, "upsert", &json!({})).is_err());
        assert!(
            Action::parse(Provider::Salesforce, "create", &json!({"sobject": "../x"})).is_err()
        );
        assert_eq!(
            Action::parse(Provider::Hubspot, "upsert-contact", &json!({})),
            Ok(Action::HubspotUpsertContact {
                id_property: "email".into()
            })
        );
        let err = Action::parse(Provider::Hubspot, "create", &json!({})).expect_err("unknown");
        assert!(err.contains("create-contact"), "{err}");
    }

    #[test]
    fn secrets_are_masked_when_shown() {
        let secret = HeaderText::Secret(SecretString::from("Bearer 00Dxx0000001gPL!AR8AQ"));
        assert_eq!(secret.masked(), "Bearer 00Dx****");
        assert_eq!(format!("{secret:?}"), "\"[redacted]\"");
        assert_eq!(mask("short"), "****");
    }

    #[test]
    fn the_clients_are_built_with_the_process_s_provider_and_never_install_one() {
        let settings = crate::config::Settings::defaults().expect("defaults");
        // No test of this crate installs a provider: the process has none.
        assert!(rustls::crypto::CryptoProvider::get_default().is_none());

        let built = Integrations::new(&settings.http, &settings.salesforce);

        assert!(
            matches!(built, Err(SetupError::NoCryptoProvider)),
            "a clear error, not a panic"
        );
        assert!(
            rustls::crypto::CryptoProvider::get_default().is_none(),
            "building the clients changes nothing process-wide"
        );
    }

    #[test]
    fn urls_join_with_one_slash() {
        assert_eq!(join_url("http://a/", "/b"), "http://a/b");
        assert_eq!(join_url("http://a", "b"), "http://a/b");
        assert_eq!(encode_segment("a b/c@d.e-f_g~h"), "a%20b%2Fc%40d.e-f_g~h");
    }
}
