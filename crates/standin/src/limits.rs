//! Per-account API limits, as the real CRMs apply them.
//!
//! - HubSpot: a rolling window per account (`max` calls per `interval_ms`). Every response
//!   under `/crm/` carries `X-HubSpot-RateLimit-Max`, `-Remaining` and
//!   `-Interval-Milliseconds`; a call over the limit is answered 429 with HubSpot's body
//!   (`"errorType": "RATE_LIMIT"`, `"policyName": "TEN_SECONDLY_ROLLING"`) and does nothing.
//! - Salesforce: every response under `/services/data/` carries
//!   `Sforce-Limit-Info: api-usage=N/M`, N counting from `used` and growing by one per call
//!   of the account.
//!
//! `GET /_standin/limits`: HubSpot calls let through and refused (`{"accepted", "refused"}`).
//! `POST /_standin/limits` `{"hubspot": {"max": 100, "interval_ms": 10000}, "salesforce": {"used": 0, "max": 15000}}`.
//! Until told, HubSpot allows 1,000,000 calls per 10 s (the headers are there, the limit
//! never bites) and Salesforce's day is 0/100,000,000 (reported on every response; a
//! demo, a benchmark or a chaos run never nears it). `"malformed": true` sends the headers
//! with values that are not numbers.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{Standin, bearer, reply};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct HubspotLimit {
    pub max: u32,
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SalesforceUsage {
    pub used: u64,
    pub max: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LimitSettings {
    #[serde(default)]
    pub hubspot: Option<HubspotLimit>,
    #[serde(default)]
    pub salesforce: Option<SalesforceUsage>,
    /// Send the limit headers with values that do not parse.
    #[serde(default)]
    pub malformed: bool,
}

pub(crate) struct Limits {
    hubspot: HubspotLimit,
    salesforce: SalesforceUsage,
    malformed: bool,
    /// Per account, when its recent HubSpot calls were accepted.
    windows: HashMap<String, VecDeque<Instant>>,
    /// Per account, Salesforce calls made.
    calls: HashMap<String, u64>,
    /// HubSpot calls refused with 429.
    pub(crate) refused: u64,
    /// HubSpot calls let through.
    pub(crate) accepted: u64,
}

/// `GET /_standin/limits`: HubSpot calls let through and refused for the limit, since start.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LimitCounts {
    pub accepted: u64,
    pub refused: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hubspot: HubspotLimit {
                max: 1_000_000,
                interval_ms: 10_000,
            },
            salesforce: SalesforceUsage {
                used: 0,
                max: 100_000_000,
            },
            malformed: false,
            windows: HashMap::new(),
            calls: HashMap::new(),
            refused: 0,
            accepted: 0,
        }
    }
}

impl Limits {
    pub(crate) fn configure(&mut self, settings: LimitSettings) {
        *self = Limits {
            refused: self.refused,
            accepted: self.accepted,
            ..Limits::default()
        };
        if let Some(hubspot) = settings.hubspot {
            self.hubspot = hubspot;
        }
        if let Some(salesforce) = settings.salesforce {
            self.salesforce = salesforce;
        }
        self.malformed = settings.malformed;
    }

    /// Counts a HubSpot call of `account`: `Ok(remaining)`, or `Err` when over the limit.
    fn hubspot_call(&mut self, account: &str) -> Result<u32, ()> {
        let now = Instant::now();
        let interval = Duration::from_millis(self.hubspot.interval_ms);
        let window = self.windows.entry(account.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= interval)
        {
            window.pop_front();
        }
        let used = u32::try_from(window.len()).unwrap_or(u32::MAX);
        if used >= self.hubspot.max {
            self.refused += 1;
            return Err(());
        }
        window.push_back(now);
        self.accepted += 1;
        Ok(self.hubspot.max - used - 1)
    }

    pub(crate) fn counts(&self) -> LimitCounts {
        LimitCounts {
            accepted: self.accepted,
            refused: self.refused,
        }
    }

    fn salesforce_call(&mut self, account: &str) -> u64 {
        let calls = self.calls.entry(account.to_owned()).or_default();
        *calls += 1;
        self.salesforce.used + *calls
    }
}

/// The middleware in front of every API route.
pub(crate) async fn enforce(
    State(standin): State<Standin>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let headers = request.headers();
    let account = standin
        .account_of(headers)
        .or_else(|| bearer(headers).map(str::to_owned))
        .unwrap_or_default();
    if path.starts_with("/crm/") {
        let (verdict, limit, malformed) = {
            let mut inner = standin.lock();
            let verdict = inner.limits.hubspot_call(&account);
            (verdict, inner.limits.hubspot, inner.limits.malformed)
        };
        let (mut response, remaining) = match verdict {
            Ok(remaining) => (next.run(request).await, remaining),
            Err(()) => {
                let method = request.method().clone();
                let uri = request.uri().clone();
                let body = json!({
                    "status": "error",
                    "message": "You have reached your ten_secondly_rolling limit.",
                    "errorType": "RATE_LIMIT",
                    "correlationId": format!("{:08x}-standin", fastrand::u32(..)),
                    "policyName": "TEN_SECONDLY_ROLLING",
                    "groupName": "publicapi:oauth:standin",
                });
                let response = reply(StatusCode::TOO_MANY_REQUESTS, body);
                (standin.lock().log(&method, &uri, response), 0)
            }
        };
        let values = if malformed {
            ["many".to_owned(), "-".to_owned(), "ten seconds".to_owned()]
        } else {
            [
                limit.max.to_string(),
                remaining.to_string(),
                limit.interval_ms.to_string(),
            ]
        };
        let names = [
            "x-hubspot-ratelimit-max",
            "x-hubspot-ratelimit-remaining",
            "x-hubspot-ratelimit-interval-milliseconds",
        ];
        for (name, value) in names.into_iter().zip(values) {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        return response;
    }
    if path.starts_with("/services/data/") {
        let mut response = next.run(request).await;
        let value = {
            let mut inner = standin.lock();
            let used = inner.limits.salesforce_call(&account);
            if inner.limits.malformed {
                "api-usage=lots/of".to_owned()
            } else {
                format!("api-usage={used}/{}", inner.limits.salesforce.max)
            }
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert("sforce-limit-info", value);
        }
        return response;
    }
    next.run(request).await
}
