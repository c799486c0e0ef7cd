//! Why one attempt of a step failed: a [`Failure`] whose [`FailureKind`] drives the retry
//! decision. Recorded on the run and in dead letters. Which response is which kind is
//! decided where the responses are read (`integrations::classify`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Network error, timeout, 5xx: try again soon.
    Transient,
    /// 429, Salesforce `REQUEST_LIMIT_EXCEEDED`: try again after the provider's delay.
    RateLimited,
    /// 401, `INVALID_SESSION_ID`: refresh the access token and try again.
    ExpiredCredentials,
    /// The refresh token was refused (`invalid_grant`): the user must reconnect.
    RevokedCredentials,
    /// Validation, duplicates, not found, other 4xx: trying again cannot help.
    Permanent,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Transient => "transient",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::ExpiredCredentials => "expired_credentials",
            FailureKind::RevokedCredentials => "revoked_credentials",
            FailureKind::Permanent => "permanent",
        }
    }
}

/// The code of [`Failure::throttled`].
pub const THROTTLED: &str = "THROTTLED";

/// Why one attempt of a step failed. Recorded on the run and in dead letters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub message: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option"
    )]
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            status: None,
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Failure {
        self.code = Some(code.into());
        self
    }

    /// The failure of a run whose batch found its account's budget spent: the run is
    /// deferred through the broker after `delay`, using none of its retries.
    pub fn throttled(delay: Duration) -> Failure {
        Failure {
            retry_after: Some(delay),
            ..Failure::new(
                FailureKind::RateLimited,
                "the account's rate budget is spent: deferred without using a retry",
            )
            .with_code(THROTTLED)
        }
    }

    /// How long a run throttled by appevents itself waits before coming back, when this is
    /// such a failure.
    pub fn throttled_delay(&self) -> Option<Duration> {
        (self.code.as_deref() == Some(THROTTLED)).then(|| self.retry_after.unwrap_or_default())
    }

    /// One line for logs, CLI listings and dead-letter reasons.
    pub fn summary(&self) -> String {
        let mut out = self.kind.as_str().to_owned();
        if let Some(status) = self.status {
            out.push_str(&format!(" {status}"));
        }
        if let Some(code) = &self.code {
            out.push_str(&format!(" {code}"));
        }
        out.push_str(": ");
        out.push_str(&self.message);
        out
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary())
    }
}
