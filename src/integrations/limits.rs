//! What providers say about an account's limit, read from every response's headers:
//! HubSpot's `X-HubSpot-RateLimit-Max`, `-Remaining` and `-Interval-Milliseconds`, and
//! Salesforce's `Sforce-Limit-Info: api-usage=N/M`.
//!
//! The pipeline runs a step inside [`observe`]; every request the step sends records its
//! response headers there ([`record`]), so the limiter learns from the follow-up requests
//! of a step (a search, an update after a conflict) as from the first, and counts them.
//! A header that does not parse is ignored with a debug log.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use reqwest::header::HeaderMap;

use crate::core::provider::Provider;

/// HubSpot's limit for the account, as its headers state it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubspotLimit {
    pub max: u32,
    pub interval: Duration,
    pub remaining: Option<u32>,
}

/// Salesforce's rolling 24-hour API usage of the org.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiUsage {
    pub used: u64,
    pub max: u64,
}

impl ApiUsage {
    pub fn share(&self) -> f64 {
        self.used as f64 / self.max as f64
    }
}

/// What the responses of one step said, the last answer winning.
#[derive(Debug, Default)]
pub struct Observer {
    requests: AtomicU32,
    /// Calls of the account's budget the step took itself (a batch's call), beyond its
    /// ticket's.
    prepaid: AtomicU32,
    hubspot: Mutex<Option<HubspotLimit>>,
    salesforce: Mutex<Option<ApiUsage>>,
}

impl Observer {
    /// Requests that got an answer.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn prepaid(&self) -> u32 {
        self.prepaid.load(Ordering::Relaxed)
    }

    pub fn hubspot(&self) -> Option<HubspotLimit> {
        *lock(&self.hubspot)
    }

    pub fn salesforce(&self) -> Option<ApiUsage> {
        *lock(&self.salesforce)
    }
}

tokio::task_local! {
    static OBSERVER: Arc<Observer>;
}

/// Runs `step` with its responses recorded in `observer`.
pub async fn observe<F: Future>(observer: Arc<Observer>, step: F) -> F::Output {
    OBSERVER.scope(observer, step).await
}

/// Notes, in the observer of the step under way, a call of budget the step took itself.
pub(crate) fn prepaid_call() {
    let _outside_a_step = OBSERVER.try_with(|observer| {
        observer.prepaid.fetch_add(1, Ordering::Relaxed);
    });
}

/// Records one response's headers in the observer of the step under way, if any.
pub(crate) fn record(provider: Provider, headers: &HeaderMap) {
    let _outside_a_step = OBSERVER.try_with(|observer| {
        observer.requests.fetch_add(1, Ordering::Relaxed);
        match provider {
            Provider::Hubspot => {
                if let Some(limit) = hubspot_limit(headers) {
                    *lock(&observer.hubspot) = Some(limit);
                }
            }
            Provider::Salesforce => {
                if let Some(usage) = api_usage(headers) {
                    *lock(&observer.salesforce) = Some(usage);
                }
            }
            Provider::Http => {}
        }
    });
}

/// HubSpot's limit headers. Absent: `None`; present but malformed (not a positive number):
/// `None`, with a debug log naming the header.
pub fn hubspot_limit(headers: &HeaderMap) -> Option<HubspotLimit> {
    let max = number(headers, "x-hubspot-ratelimit-max")?;
    let interval = number(headers, "x-hubspot-ratelimit-interval-milliseconds")?;
    if max == 0 || interval == 0 {
        tracing::debug!(
            max,
            interval,
            "ignoring HubSpot rate-limit headers with a zero limit"
        );
        return None;
    }
    Some(HubspotLimit {
        max: u32::try_from(max).unwrap_or(u32::MAX),
        interval: Duration::from_millis(interval),
        remaining: number(headers, "x-hubspot-ratelimit-remaining")
            .map(|r| u32::try_from(r).unwrap_or(u32::MAX)),
    })
}

/// `Sforce-Limit-Info: api-usage=25/5000; per-app-api-usage=…`: the org's usage.
pub fn api_usage(headers: &HeaderMap) -> Option<ApiUsage> {
    let value = headers.get("sforce-limit-info")?;
    let parsed = value.to_str().ok().and_then(|text| {
        text.split(';')
            .filter_map(|part| part.trim().split_once('='))
            .find(|(key, _)| key.trim() == "api-usage")
            .and_then(|(_, usage)| usage.trim().split_once('/'))
            .and_then(|(used, max)| Some((used.parse().ok()?, max.parse().ok()?)))
            .filter(|(_, max): &(u64, u64)| *max > 0)
            .map(|(used, max)| ApiUsage { used, max })
    });
    if parsed.is_none() {
        tracing::debug!(header = ?value, "ignoring a malformed Sforce-Limit-Info header");
    }
    parsed
}

fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    let value = headers.get(name)?;
    let parsed = value.to_str().ok().and_then(|t| t.trim().parse().ok());
    if parsed.is_none() {
        tracing::debug!(header = name, value = ?value, "ignoring a malformed rate-limit header");
    }
    parsed
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn hubspot_s_limit_is_read_from_its_headers() {
        let limit = hubspot_limit(&headers(&[
            ("X-HubSpot-RateLimit-Max", "190"),
            ("X-HubSpot-RateLimit-Remaining", "189"),
            ("X-HubSpot-RateLimit-Interval-Milliseconds", "10000"),
        ]));
        assert_eq!(
            limit,
            Some(HubspotLimit {
                max: 190,
                interval: Duration::from_secs(10),
                remaining: Some(189)
            })
        );
    }

    #[test]
    fn malformed_limit_headers_are_ignored() {
        for bad in [
            [
                ("X-HubSpot-RateLimit-Max", "lots"),
                ("X-HubSpot-RateLimit-Interval-Milliseconds", "10000"),
            ],
            [
                ("X-HubSpot-RateLimit-Max", "-1"),
                ("X-HubSpot-RateLimit-Interval-Milliseconds", "10000"),
            ],
            [
                ("X-HubSpot-RateLimit-Max", "0"),
                ("X-HubSpot-RateLimit-Interval-Milliseconds", "10000"),
            ],
            [
                ("X-HubSpot-RateLimit-Max", "100"),
                ("X-HubSpot-RateLimit-Interval-Milliseconds", "1e4"),
            ],
        ] {
            assert_eq!(hubspot_limit(&headers(&bad)), None, "{bad:?}");
        }
        for bad in [
            "api-usage=abc/5000",
            "api-usage=10/0",
            "api-usage=10",
            "per-app-api-usage=17/250(appName=x)",
            "",
        ] {
            assert_eq!(
                api_usage(&headers(&[("Sforce-Limit-Info", bad)])),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn salesforce_s_usage_is_read_among_the_header_s_fields() {
        let usage = api_usage(&headers(&[(
            "Sforce-Limit-Info",
            "api-usage=10018/100000; per-app-api-usage=17/250(appName=sample-connected-app)",
        )]));
        assert_eq!(
            usage,
            Some(ApiUsage {
                used: 10018,
                max: 100000
            })
        );
        assert!(usage.is_some_and(|u| (u.share() - 0.10018).abs() < 1e-9));
    }

    #[tokio::test]
    async fn a_step_s_responses_are_recorded_in_its_observer_only() {
        let observer = Arc::new(Observer::default());
        let sf = headers(&[("Sforce-Limit-Info", "api-usage=5/10")]);
        observe(observer.clone(), async {
            record(Provider::Salesforce, &sf);
            record(Provider::Salesforce, &HeaderMap::new());
        })
        .await;
        record(Provider::Salesforce, &sf);

        assert_eq!(observer.requests(), 2);
        assert_eq!(observer.salesforce(), Some(ApiUsage { used: 5, max: 10 }));
    }
}
