//! Configuration in layers: the compiled-in `config/default.toml`, an environment file,
//! an optional `--config` file, `APPEVENTS__SECTION__KEY` variables, then `DATABASE_URL`
//! and `AMQP_URL`. Every setting is documented in `config/default.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The defaults, compiled in so the binary runs anywhere with every setting present.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub worker: WorkerSettings,
    pub retry: RetrySettings,
    pub http: HttpSettings,
    pub salesforce: SalesforceSettings,
    pub server: ServerSettings,
    pub secrets: SecretSettings,
    pub log: LogSettings,
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
    /// Loads the layers named by `sources`.
    pub fn load(sources: &Sources) -> Result<Settings, config::ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let (Some(dir), Some(env)) = (&sources.config_dir, &sources.environment) {
            builder = builder.add_source(environment_file(dir, env).required(false));
        }
        if let Some(file) = &sources.file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
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
                        .try_parsing(true),
                )
                .set_override_option("database.url", std::env::var("DATABASE_URL").ok())?
                .set_override_option("amqp.url", std::env::var("AMQP_URL").ok())?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
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
        if self.amqp.prefetch == 0 {
            return fail("amqp.prefetch must be at least 1");
        }
        if self.retry.in_process_tries == 0 {
            return fail("retry.attempts must be at least 1 (the first try counts)");
        }
        if self.retry.schedule.iter().any(Duration::is_zero) {
            return fail("retry.schedule delays must be longer than zero");
        }
        Ok(())
    }

    pub fn database_url(&self) -> &str {
        self.database.url.expose_secret()
    }

    pub fn amqp_url(&self) -> &str {
        self.amqp.url.expose_secret()
    }
}

/// A list of humantime durations ("10s", "5m").
fn durations<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
    let parsed: Vec<humantime_serde::Serde<Duration>> = Deserialize::deserialize(deserializer)?;
    Ok(parsed
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
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
    fn compiled_defaults_parse_and_validate() {
        let settings = Settings::defaults().expect("default.toml is valid");
        assert_eq!(settings.amqp.exchange, "app_events");
        assert_eq!(settings.retry.schedule.len(), 5);
        assert_eq!(settings.retry.schedule[0], Duration::from_secs(10));
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
        assert_eq!(settings.amqp.prefetch, 256);
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
}
