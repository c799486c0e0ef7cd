//! Configuration in layers: the compiled-in `config/default.toml`, an environment file,
//! an optional `--config` file, `APPEVENTS__SECTION__KEY` variables, then `DATABASE_URL`
//! and `AMQP_URL`. Every setting is documented in `config/default.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub mod rate_limit;

use rate_limit::RateLimit;

/// The defaults, compiled in so the binary runs anywhere with every setting present.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The `local` environment's layer (a development key, the stand-in's OAuth apps), compiled
/// in as well: used when the config directory has no `local.toml`, so the documented setup
/// works from any directory and from an installed binary. Any other environment reads only
/// its own file.
pub const LOCAL_TOML: &str = include_str!("../config/local.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub worker: WorkerSettings,
    pub retry: RetrySettings,
    pub history: HistorySettings,
    pub http: HttpSettings,
    pub salesforce: SalesforceSettings,
    pub rate_limits: RateLimitSettings,
    pub batching: BatchingSettings,
    pub server: ServerSettings,
    pub secrets: SecretSettings,
    pub user_tokens: UserTokenSettings,
    pub portal: PortalSettings,
    pub console: ConsoleSettings,
    pub oauth: OAuthSettings,
    pub log: LogSettings,
    /// The layers read, in order, for messages that depend on them ("no encryption key").
    #[serde(skip)]
    pub read_from: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub tls_ca_file: String,
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    pub url: SecretString,
    /// Extra CA certificates (a PEM file) trusted for `amqps://`; empty for none.
    #[serde(default)]
    pub tls_ca_file: String,
    pub exchange: String,
    pub queue: String,
    pub dead_letter_queue: String,
    pub prefetch: u16,
    pub delivery_limit: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub max_message_bytes: usize,
    pub max_json_depth: usize,
    pub max_deliveries: u32,
    #[serde(with = "humantime_serde")]
    pub claim_lease: Duration,
    #[serde(with = "humantime_serde")]
    pub run_timeout: Duration,
    /// For fault-injection tests only: exit abruptly right after a provider's answer.
    pub crash_after_provider_answer: bool,
    /// For fault-injection tests only: exit abruptly right after the step of this name (of
    /// a workflow of several steps) is recorded as succeeded. Empty: never.
    #[serde(default)]
    pub crash_after_step: String,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub ops_listen: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RetrySettings {
    /// Tries in process, the first included (the key is `retry.attempts`).
    #[serde(rename = "attempts")]
    pub in_process_tries: usize,
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_in_process_wait: Duration,
    #[serde(deserialize_with = "durations")]
    pub schedule: Vec<Duration>,
    #[serde(with = "humantime_serde")]
    pub rate_limited_min_delay: Duration,
}

/// How long run history is kept: the deduplication window.
#[derive(Debug, Clone, Deserialize)]
pub struct HistorySettings {
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub max_response_bytes: usize,
    pub pool_max_idle_per_host: usize,
    pub allow: Vec<String>,
    pub user_agent: String,
}

/// Per-account rate limits, shared by the fleet (`pipeline::throttle`). Limits are written
/// `calls/interval` ("100/10s"); "none" for no limit.
#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitSettings {
    pub hubspot: String,
    pub salesforce: String,
    pub http: String,
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    pub in_flight_per_connection: usize,
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    pub salesforce_slow_down: f64,
    pub salesforce_defer: f64,
    #[serde(with = "humantime_serde")]
    pub salesforce_slow_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub salesforce_defer_for: Duration,
}

impl RateLimitSettings {
    /// The default limit of a provider's connections: `rate_limits.<provider>`.
    pub fn default_for(&self, provider: &str) -> Result<Option<RateLimit>, String> {
        let text = match provider {
            "hubspot" => &self.hubspot,
            "salesforce" => &self.salesforce,
            _ => &self.http,
        };
        rate_limit::parse_optional(text).map_err(|e| format!("rate_limits.{provider}: {e}"))
    }

    fn validate(&self) -> Result<(), String> {
        for provider in ["hubspot", "salesforce", "http"] {
            self.default_for(provider)?;
        }
        if self.in_flight_per_connection == 0 {
            return Err("rate_limits.in_flight_per_connection must be at least 1".into());
        }
        let share = |key: &str, value: f64| {
            if value > 0.0 && value <= 1.0 {
                Ok(())
            } else {
                Err(format!(
                    "rate_limits.{key} must be a share of the daily limit above 0 and at most 1, not {value}"
                ))
            }
        };
        share("salesforce_slow_down", self.salesforce_slow_down)?;
        share("salesforce_defer", self.salesforce_defer)?;
        if self.salesforce_slow_down > self.salesforce_defer {
            return Err(format!(
                "rate_limits.salesforce_slow_down ({}) must not be above rate_limits.salesforce_defer ({})",
                self.salesforce_slow_down, self.salesforce_defer
            ));
        }
        if self.refresh.is_zero() || self.salesforce_defer_for.is_zero() {
            return Err(
                "rate_limits.refresh and rate_limits.salesforce_defer_for must be longer than zero"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The actions with a batch endpoint, as `provider action`: what `batching.off` may name.
pub const BATCHABLE: &[&str] = &[
    "hubspot create-contact",
    "hubspot update-contact",
    "hubspot upsert-contact",
    "salesforce create",
    "salesforce upsert",
];

/// Runs of one action on one connection sent together through the provider's batch
/// endpoint (`pipeline::provider_batch`).
#[derive(Debug, Clone, Deserialize)]
pub struct BatchingSettings {
    pub enabled: bool,
    /// The longest a run waits for others to share its call.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Batchable actions sent one record per call all the same, as `provider action`.
    pub off: Vec<String>,
}

impl BatchingSettings {
    /// Whether runs of the action named `provider action` are batched.
    pub fn batches(&self, name: &str) -> bool {
        self.enabled && !self.off.iter().any(|off| off == name)
    }

    fn validate(&self) -> Result<(), String> {
        if self.window.is_zero() || self.window > Duration::from_secs(1) {
            return Err(format!(
                "batching.window must be longer than zero and at most 1s, not {:?}",
                self.window
            ));
        }
        let batchable = BATCHABLE;
        if let Some(unknown) = self
            .off
            .iter()
            .find(|name| !batchable.contains(&name.as_str()))
        {
            return Err(format!(
                "batching.off: {unknown:?} is not a batchable action; expected one of {}",
                batchable.join(", ")
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct SalesforceSettings {
    pub api_version: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub listen: String,
    pub api_keys: Vec<SecretString>,
    pub max_body_bytes: usize,
    pub max_batch: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecretSettings {
    pub keys: BTreeMap<String, SecretString>,
    pub active_key: String,
}

/// How the product's backend vouches for its end users: short-lived JWTs it signs.
#[derive(Debug, Clone, Deserialize)]
pub struct UserTokenSettings {
    /// Signing keys by `kid`: every one of them verifies, so a key can be rotated.
    pub keys: BTreeMap<String, SecretString>,
    /// The key `appevents users token` signs with; empty when this side only verifies.
    pub signing_key: String,
    pub audience: String,
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
}

/// The Connect Portal's pages.
#[derive(Debug, Clone, Deserialize)]
pub struct PortalSettings {
    pub frame_ancestors: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub authorization_ttl: Duration,
    pub secure_cookie: bool,
}

/// The operator console's access.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsoleSettings {
    /// Operator keys by operator name: a key logs its operator in, and the name is who the
    /// audit log says acted.
    pub operators: BTreeMap<String, SecretString>,
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    pub secure_cookie: bool,
}

/// The OAuth apps end users connect their accounts through.
#[derive(Debug, Clone, Deserialize)]
pub struct OAuthSettings {
    pub salesforce: SalesforceOAuth,
    pub hubspot: HubspotOAuth,
}

/// What every provider's OAuth app has.
#[derive(Debug, Clone, Deserialize)]
pub struct OAuthApp {
    pub client_id: String,
    pub client_secret: SecretString,
    pub scopes: Vec<String>,
    pub redirect_url: String,
    pub pkce: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SalesforceOAuth {
    #[serde(flatten)]
    pub app: OAuthApp,
    /// Where users log in: login.salesforce.com, test.salesforce.com or a My Domain. The
    /// authorize, token and revoke endpoints are under it.
    pub login_url: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HubspotOAuth {
    #[serde(flatten)]
    pub app: OAuthApp,
    pub authorize_url: String,
    /// The API: token, token information and refresh-token endpoints, and the base URL of
    /// the connections made.
    pub api_url: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Where the layers come from; `Sources::from_env` is what the binary uses.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Directory holding `{environment}.toml`.
    pub config_dir: Option<PathBuf>,
    pub environment: Option<String>,
    /// The `--config FILE` given on the command line.
    pub file: Option<PathBuf>,
    /// Read `APPEVENTS__*`, `DATABASE_URL` and `AMQP_URL`.
    pub read_env: bool,
}

impl Sources {
    pub fn from_env(file: Option<PathBuf>) -> Self {
        Sources {
            config_dir: Some(
                std::env::var_os("APPEVENTS_CONFIG_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("config")),
            ),
            environment: Some(
                std::env::var("APPEVENTS_ENVIRONMENT").unwrap_or_else(|_| "local".to_owned()),
            ),
            file,
            read_env: true,
        }
    }
}

impl Settings {
    /// Whether secrets are sealed with the `local` environment's development key, which is
    /// committed and so public: fine for a demo, never for real credentials.
    pub fn uses_development_key(&self) -> bool {
        let local = config::Config::builder()
            .add_source(config::File::from_str(LOCAL_TOML, config::FileFormat::Toml))
            .build();
        let Ok(development) = local.and_then(|l| l.get_string("secrets.keys.dev")) else {
            return false;
        };
        self.secrets
            .keys
            .get(&self.secrets.active_key)
            .is_some_and(|key| key.expose_secret() == development)
    }

    /// Says in the log, at a long-running command's start, that the development key is in use.
    pub fn warn_if_development_key(&self) {
        if self.uses_development_key() {
            tracing::warn!(
                "secrets are sealed with the local environment's development key, which is public: \
                 set APPEVENTS_ENVIRONMENT=production and a key of your own before storing real credentials"
            );
        }
    }

    /// Loads the layers named by `sources`.
    pub fn load(sources: &Sources) -> Result<Settings, config::ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        let mut read_from = vec!["the built-in defaults".to_owned()];
        if let (Some(dir), Some(env)) = (&sources.config_dir, &sources.environment) {
            let path = dir.join(format!("{env}.toml"));
            if path.is_file() {
                builder = builder.add_source(environment_file(dir, env));
                read_from.push(absolute(&path));
            } else if env == "local" {
                builder = builder
                    .add_source(config::File::from_str(LOCAL_TOML, config::FileFormat::Toml));
                read_from.push(format!(
                    "the built-in local settings (no {} found)",
                    absolute(&path)
                ));
            } else {
                read_from.push(format!("no {} found", absolute(&path)));
            }
        }
        if let Some(file) = &sources.file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
            read_from.push(absolute(file));
        }
        if sources.read_env {
            builder = builder
                .add_source(
                    config::Environment::with_prefix("APPEVENTS")
                        .prefix_separator("__")
                        .separator("__")
                        .list_separator(",")
                        .with_list_parse_key("server.api_keys")
                        .with_list_parse_key("retry.schedule")
                        .with_list_parse_key("http.allow")
                        .with_list_parse_key("portal.frame_ancestors")
                        .with_list_parse_key("oauth.salesforce.scopes")
                        .with_list_parse_key("oauth.hubspot.scopes")
                        .try_parsing(true),
                )
                .set_override_option("database.url", std::env::var("DATABASE_URL").ok())?
                .set_override_option("amqp.url", std::env::var("AMQP_URL").ok())?;
        }
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        if sources.read_env {
            read_from.push("the environment (APPEVENTS__*, DATABASE_URL, AMQP_URL)".to_owned());
        }
        settings.read_from = read_from;
        Ok(settings)
    }

    /// The compiled-in defaults alone: what tests start from before adjusting fields.
    pub fn defaults() -> Result<Settings, config::ConfigError> {
        Settings::load(&Sources::default())
    }

    fn validate(&self) -> Result<(), config::ConfigError> {
        let fail = |msg: &str| Err(config::ConfigError::Message(msg.to_owned()));
        if self.worker.concurrency == 0 {
            return fail("worker.concurrency must be at least 1");
        }
        amqp_nodes(self.amqp_url()).map_err(config::ConfigError::Message)?;
        if self.amqp.prefetch == 0 {
            return fail("amqp.prefetch must be at least 1");
        }
        if self.worker.claim_lease < Duration::from_secs(1) {
            return fail(
                "worker.claim_lease must be at least 1s (it is renewed every third of it)",
            );
        }
        if self.worker.run_timeout.is_zero() {
            return fail("worker.run_timeout must be longer than zero");
        }
        if self.retry.in_process_tries == 0 {
            return fail("retry.attempts must be at least 1 (the first try counts)");
        }
        if self.retry.schedule.iter().any(Duration::is_zero) {
            return fail("retry.schedule delays must be longer than zero");
        }
        if self.history.prune_interval.is_zero() {
            return fail("history.prune_interval must be longer than zero");
        }
        self.validate_retention()
            .map_err(config::ConfigError::Message)?;
        self.rate_limits
            .validate()
            .map_err(config::ConfigError::Message)?;
        self.batching
            .validate()
            .map_err(config::ConfigError::Message)?;
        self.validate_portal()
            .map_err(config::ConfigError::Message)?;
        self.validate_console()
            .map_err(config::ConfigError::Message)
    }

    /// The longest a run can stay unfinished: every broker-level retry waiting in the
    /// longest retry queue (a wanted delay is rounded to one of the schedule's queues), plus,
    /// for the first try and the one after each wait, the longest a live worker may run it
    /// (`worker.run_timeout`) and the lease a dead worker's claim outlives it by.
    pub fn longest_run_span(&self) -> Duration {
        let longest = self
            .retry
            .schedule
            .iter()
            .max()
            .copied()
            .unwrap_or_default();
        let tries = u32::try_from(self.retry.schedule.len()).unwrap_or(u32::MAX);
        longest.saturating_mul(tries).saturating_add(
            self.worker
                .run_timeout
                .saturating_add(self.worker.claim_lease)
                .saturating_mul(tries.saturating_add(1)),
        )
    }

    /// A run forgotten while its retry is still queued would run again as a new event: the
    /// retention must outlast every run.
    fn validate_retention(&self) -> Result<(), String> {
        let span = self.longest_run_span();
        if self.history.retention > span {
            return Ok(());
        }
        Err(format!(
            "history.retention ({}) must be longer than the longest a run can take, {} \
             (retry.schedule: {} retries of up to {} each, plus worker.run_timeout {} and \
             worker.claim_lease {} per try)",
            humantime::format_duration(self.history.retention),
            humantime::format_duration(span),
            self.retry.schedule.len(),
            humantime::format_duration(
                self.retry
                    .schedule
                    .iter()
                    .max()
                    .copied()
                    .unwrap_or_default()
            ),
            humantime::format_duration(self.worker.run_timeout),
            humantime::format_duration(self.worker.claim_lease),
        ))
    }

    /// The console's operator keys: long enough not to be guessed, one per operator.
    fn validate_console(&self) -> Result<(), String> {
        for (name, key) in &self.console.operators {
            if key.expose_secret().len() < MIN_OPERATOR_KEY_CHARS {
                return Err(format!(
                    "console.operators.{name} must be at least {MIN_OPERATOR_KEY_CHARS} characters"
                ));
            }
        }
        if self.console.session_ttl.is_zero() {
            return Err("console.session_ttl must be longer than zero".into());
        }
        Ok(())
    }

    /// The Connect Portal's keys and URLs, each error naming its key.
    fn validate_portal(&self) -> Result<(), String> {
        let tokens = &self.user_tokens;
        for (kid, key) in &tokens.keys {
            if key.expose_secret().len() < MIN_USER_TOKEN_KEY_BYTES {
                return Err(format!(
                    "user_tokens.keys.{kid} must be at least {MIN_USER_TOKEN_KEY_BYTES} bytes"
                ));
            }
        }
        if !tokens.signing_key.is_empty() && !tokens.keys.contains_key(&tokens.signing_key) {
            return Err(format!(
                "user_tokens.signing_key {:?} is not one of user_tokens.keys",
                tokens.signing_key
            ));
        }
        if tokens.audience.trim().is_empty() {
            return Err("user_tokens.audience must not be empty".into());
        }
        if tokens.max_lifetime.is_zero() {
            return Err("user_tokens.max_lifetime must be longer than zero".into());
        }
        let portal = &self.portal;
        if portal.session_ttl < tokens.max_lifetime {
            // A used token is remembered as long as its session: it must outlive the token.
            return Err("portal.session_ttl must be at least user_tokens.max_lifetime".into());
        }
        if portal.authorization_ttl.is_zero() {
            return Err("portal.authorization_ttl must be longer than zero".into());
        }
        for origin in &portal.frame_ancestors {
            check_origin(origin).map_err(|e| format!("portal.frame_ancestors: {e}"))?;
        }
        let salesforce = &self.oauth.salesforce;
        check_app("oauth.salesforce", &salesforce.app)?;
        check_url("oauth.salesforce.login_url", &salesforce.login_url)?;
        let hubspot = &self.oauth.hubspot;
        check_app("oauth.hubspot", &hubspot.app)?;
        check_url("oauth.hubspot.authorize_url", &hubspot.authorize_url)?;
        check_url("oauth.hubspot.api_url", &hubspot.api_url)
    }

    pub fn database_url(&self) -> &str {
        self.database.url.expose_secret()
    }

    pub fn amqp_url(&self) -> &str {
        self.amqp.url.expose_secret()
    }
}

/// The nodes of `amqp.url`, in the order they are tried: one `amqp://` or `amqps://` URL, or
/// several separated by commas (the nodes of one cluster). Errors name the node by its
/// position, never by its text, which may hold a password.
pub fn amqp_nodes(url: &str) -> Result<Vec<&str>, String> {
    let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
    let count = nodes.len();
    for (index, node) in nodes.iter().enumerate() {
        let which = if count == 1 {
            "amqp.url".to_owned()
        } else {
            format!("amqp.url: node {} of {count}", index + 1)
        };
        if node.is_empty() {
            return Err(format!(
                "{which} is empty (several nodes are written amqp://host-a:5672/vhost,amqp://host-b:5672/vhost)"
            ));
        }
        let parsed = reqwest::Url::parse(node).map_err(|e| format!("{which} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "amqp" | "amqps") || parsed.host_str().is_none() {
            return Err(format!(
                "{which} must be an amqp:// or amqps:// URL with a host"
            ));
        }
        // What the client itself accepts (its query options, say); its message may quote
        // the URL, so only the kind of error is kept.
        node.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            format!(
                "{which} is not an AMQP URL: {}",
                e.split(':').next().unwrap_or("invalid")
            )
        })?;
    }
    Ok(nodes)
}

/// HS256 keys shorter than the hash are weak (RFC 7518 §3.2).
const MIN_USER_TOKEN_KEY_BYTES: usize = 32;
/// The shortest operator key accepted: as long as a user token key.
const MIN_OPERATOR_KEY_CHARS: usize = 32;

fn check_url(key: &str, value: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(value).map_err(|e| format!("{key} {value:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{key} {value:?} must be an http or https URL"));
    }
    Ok(())
}

/// An origin as CSP's frame-ancestors takes it: scheme, host and optional port, no path.
fn check_origin(value: &str) -> Result<(), String> {
    check_url("origin", value)?;
    let url = reqwest::Url::parse(value).map_err(|e| e.to_string())?;
    if url.path() != "/" || value.ends_with('/') || url.query().is_some() {
        return Err(format!(
            "{value:?} must be an origin (scheme://host[:port]), without a path"
        ));
    }
    Ok(())
}

/// An app's settings; an app without a client id is not set up, and its provider cannot be
/// connected, but its URLs must still be right.
fn check_app(key: &str, app: &OAuthApp) -> Result<(), String> {
    check_url(&format!("{key}.redirect_url"), &app.redirect_url)?;
    if app.client_id.is_empty() {
        return Ok(());
    }
    if app.client_secret.expose_secret().is_empty() {
        return Err(format!(
            "{key}.client_secret must be set when {key}.client_id is"
        ));
    }
    if app.scopes.iter().any(|scope| scope.trim().is_empty()) {
        return Err(format!("{key}.scopes must not hold an empty scope"));
    }
    Ok(())
}

/// A list of humantime durations ("10s", "5m").
fn durations<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
    let parsed: Vec<humantime_serde::Serde<Duration>> = Deserialize::deserialize(deserializer)?;
    Ok(parsed
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
}

/// A path as an operator finds it: absolute when the working directory is known.
fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

fn environment_file(
    dir: &Path,
    env: &str,
) -> config::File<config::FileSourceFile, config::FileFormat> {
    config::File::from(dir.join(format!("{env}.toml"))).format(config::FileFormat::Toml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_layer_is_built_in_when_no_file_is_found() {
        let empty = std::env::temp_dir().join(format!("appevents-config-{}", uuid::Uuid::new_v4()));
        let sources = |environment: &str| Sources {
            config_dir: Some(empty.clone()),
            environment: Some(environment.to_owned()),
            ..Sources::default()
        };

        let local = Settings::load(&sources("local")).expect("loads");
        assert_eq!(local.secrets.active_key, "dev");
        assert!(local.uses_development_key());
        assert!(
            local.read_from[1].starts_with("the built-in local settings (no "),
            "{:?}",
            local.read_from
        );
        let production = Settings::load(&sources("production")).expect("loads");
        assert!(
            production.secrets.active_key.is_empty(),
            "no key but its own"
        );
        assert!(!production.uses_development_key());
        assert!(
            production.read_from[1].contains("production.toml found"),
            "{:?}",
            production.read_from
        );
    }

    #[test]
    fn compiled_defaults_parse_and_validate() {
        let settings = Settings::defaults().expect("default.toml is valid");
        assert_eq!(settings.amqp.exchange, "app_events");
        assert_eq!(settings.retry.schedule.len(), 5);
        assert_eq!(settings.retry.schedule[0], Duration::from_secs(10));
    }

    #[test]
    fn a_retention_shorter_than_the_longest_run_is_refused_naming_both() {
        let mut settings = Settings::defaults().expect("defaults");
        settings.history.retention = Duration::from_secs(3600);

        let error = settings
            .validate()
            .expect_err("an hour is shorter than the schedule");

        // Five retries of up to 30 minutes, plus six tries of a 90 s run timeout and a 15 s
        // claim lease each.
        let message = error.to_string();
        assert!(message.contains("history.retention (1h)"), "{message}");
        assert!(message.contains("2h 40m 30s"), "{message}");
        assert!(message.contains("retry.schedule"), "{message}");
        assert!(message.contains("worker.run_timeout 1m 30s"), "{message}");
        assert!(message.contains("worker.claim_lease 15s"), "{message}");
        settings.history.retention = Duration::from_secs(2 * 3600 + 41 * 60);
        settings.validate().expect("longer than every run");
    }

    #[test]
    fn an_override_file_replaces_only_what_it_names() {
        let dir = std::env::temp_dir().join(format!("appevents-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("override.toml");
        std::fs::write(&file, "[worker]\nconcurrency = 7\n").expect("write");
        let sources = Sources {
            file: Some(file),
            ..Sources::default()
        };
        let settings = Settings::load(&sources).expect("loads");
        assert_eq!(settings.worker.concurrency, 7);
        assert_eq!(settings.amqp.prefetch, 512);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn the_retry_attempts_key_sets_the_in_process_tries() {
        let dir = std::env::temp_dir().join(format!("appevents-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("tries.toml");
        std::fs::write(&file, "[retry]\nattempts = 5\n").expect("write");
        let sources = Sources {
            file: Some(file),
            ..Sources::default()
        };

        let settings = Settings::load(&sources).expect("loads");

        assert_eq!(settings.retry.in_process_tries, 5);
        assert_eq!(
            Settings::defaults()
                .expect("defaults")
                .retry
                .in_process_tries,
            3
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_zero_concurrency_is_refused() {
        let dir = std::env::temp_dir().join(format!("appevents-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("bad.toml");
        std::fs::write(&file, "[worker]\nconcurrency = 0\n").expect("write");
        let sources = Sources {
            file: Some(file),
            ..Sources::default()
        };
        let err = Settings::load(&sources).expect_err("refused");
        assert!(err.to_string().contains("worker.concurrency"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn bad_rate_limits_are_refused_at_startup_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("appevents-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (toml, key, says) in [
            ("hubspot = \"0/10s\"", "rate_limits.hubspot", "at least 1"),
            (
                "salesforce = \"-3/1s\"",
                "rate_limits.salesforce",
                "at least 1",
            ),
            ("http = \"fast\"", "rate_limits.http", "not a limit"),
            (
                "in_flight_per_connection = 0",
                "rate_limits.in_flight_per_connection",
                "at least 1",
            ),
            (
                "salesforce_defer = 0.0",
                "rate_limits.salesforce_defer",
                "above 0",
            ),
            (
                "salesforce_slow_down = 0.99",
                "rate_limits.salesforce_slow_down",
                "must not be above",
            ),
        ] {
            let file = dir.join("bad.toml");
            std::fs::write(&file, format!("[rate_limits]\n{toml}\n")).expect("write");
            let sources = Sources {
                file: Some(file),
                ..Sources::default()
            };
            let err = Settings::load(&sources).expect_err(toml).to_string();
            assert!(err.contains(key) && err.contains(says), "{toml}: {err}");
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn bad_batching_is_refused_at_startup_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("appevents-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (toml, says) in [
            (
                "window = \"0ms\"",
                "batching.window must be longer than zero",
            ),
            ("window = \"5s\"", "at most 1s"),
            (
                "off = [\"hubspot associate\"]",
                "batching.off: \"hubspot associate\" is not a batchable action",
            ),
        ] {
            let file = dir.join("bad.toml");
            std::fs::write(&file, format!("[batching]\n{toml}\n")).expect("write");
            let sources = Sources {
                file: Some(file),
                ..Sources::default()
            };
            let err = Settings::load(&sources).expect_err(toml).to_string();
            assert!(err.contains(says), "{toml}: {err}");
        }
        std::fs::remove_dir_all(dir).ok();
        let settings = Settings::defaults().expect("defaults");
        assert!(settings.batching.batches("hubspot upsert-contact"));
        let off = BatchingSettings {
            off: vec!["salesforce create".into()],
            ..settings.batching.clone()
        };
        assert!(!off.batches("salesforce create") && off.batches("salesforce upsert"));
    }

    #[test]
    fn several_amqp_nodes_are_separated_by_commas_and_bad_ones_refused() {
        assert_eq!(
            amqp_nodes("amqp://u:p@a:5672/%2f, amqps://u:p@b:5671/%2f").expect("two nodes"),
            vec!["amqp://u:p@a:5672/%2f", "amqps://u:p@b:5671/%2f"]
        );
        assert_eq!(amqp_nodes("amqp://a/%2f").expect("one").len(), 1);
        for (url, says) in [
            ("amqp://a/%2f,", "node 2 of 2 is empty"),
            ("amqp://a/%2f, ,amqp://b", "node 2 of 3 is empty"),
            (
                "http://u:secret@a/%2f,amqp://b",
                "node 1 of 2 must be an amqp:// or amqps://",
            ),
            (
                "amqp://u:secret@a/%2f,b:5672",
                "node 2 of 2 must be an amqp://",
            ),
            ("amqp://u:secret@a/%2f,rmq2", "node 2 of 2 is not a URL"),
            ("", "amqp.url is empty"),
        ] {
            let err = amqp_nodes(url).expect_err(url);
            assert!(err.contains(says), "{url}: {err}");
            assert!(!err.contains("secret"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    fn refused(toml: &str) -> String {
        let dir = std::env::temp_dir().join(format!("appevents-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("bad.toml");
        std::fs::write(&file, toml).expect("write");
        let sources = Sources {
            file: Some(file),
            ..Sources::default()
        };
        let err = Settings::load(&sources).expect_err("refused");
        std::fs::remove_dir_all(dir).ok();
        err.to_string()
    }

    #[test]
    fn bad_portal_settings_are_refused_with_their_key_named() {
        let cases = [
            (
                "[user_tokens]\nkeys = { k1 = \"short\" }\n",
                "user_tokens.keys.k1 must be at least 32 bytes",
            ),
            (
                "[user_tokens]\nsigning_key = \"k9\"\n",
                "user_tokens.signing_key \"k9\" is not one of user_tokens.keys",
            ),
            (
                "[portal]\nframe_ancestors = [\"https://app.example.com/path\"]\n",
                "portal.frame_ancestors",
            ),
            (
                "[portal]\nframe_ancestors = [\"app.example.com\"]\n",
                "portal.frame_ancestors",
            ),
            ("[portal]\nsession_ttl = \"1m\"\n", "portal.session_ttl"),
            (
                "[oauth.salesforce]\nlogin_url = \"login.salesforce.com\"\n",
                "oauth.salesforce.login_url",
            ),
            (
                "[oauth.hubspot]\nclient_id = \"app\"\n",
                "oauth.hubspot.client_secret must be set",
            ),
            (
                "[oauth.hubspot]\nredirect_url = \"ftp://x/cb\"\n",
                "oauth.hubspot.redirect_url",
            ),
        ];
        for (toml, expected) in cases {
            let err = refused(toml);
            assert!(err.contains(expected), "{toml}: {err}");
        }
    }
}
