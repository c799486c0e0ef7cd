//! Prometheus metrics. Each process builds its own registry (no global state), so tests in
//! one process each see their own counters.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    /// Events consumed, by outcome: processed, unmatched, invalid, poison, payload_mismatch
    /// (rejected by the payload check).
    pub events: Family<Labels, Counter>,
    /// Unmatched events by reason: unknown_event, no_subscription.
    pub unmatched: Family<Labels, Counter>,
    /// Runs by provider and outcome: succeeded, retry, dead, skipped, deferred (held by another
    /// worker, waiting for its lease; or its account throttled, see `throttled`).
    pub runs: Family<Labels, Counter>,
    /// Broker-level retries scheduled, by failure kind.
    pub retries: Family<Labels, Counter>,
    /// Messages dead-lettered, by reason code.
    pub dead_letters: Family<Labels, Counter>,
    /// Seconds per provider step attempt, by provider.
    pub step_seconds: Family<Labels, Histogram>,
    pub events_in_flight: Gauge,
    pub consumer_connected: Gauge,
    /// Access token refreshes by result.
    pub token_refreshes: Family<Labels, Counter>,
    /// HTTP ingest: events accepted and refused by status.
    pub ingested: Family<Labels, Counter>,
    /// Events whose payload does not match their app event's example, by app event (its
    /// current name), under a payload check of warn or reject.
    pub payload_mismatches: Family<Labels, Counter>,
    /// Passes over the run history, by result: pruned, busy (another process did it), failed.
    pub history_prunes: Family<Labels, Counter>,
    /// Deduplication keys of expired runs deleted.
    pub history_pruned_keys: Counter,
    /// Daily partitions of expired runs dropped.
    pub history_pruned_partitions: Counter,
    /// Provider requests answered, by provider: with `events`, the calls per event.
    pub provider_calls: Family<Labels, Counter>,
    /// Records per call of a provider's batch endpoint, by action (`hubspot upsert-contact`).
    pub batch_records: Family<Labels, Histogram>,
    /// Seconds a run waited in process for its account's budget, by provider.
    pub throttle_waits: Family<Labels, Histogram>,
    /// Runs appevents deferred through the broker to respect an account's limit, by provider
    /// and reason: budget, in_flight, salesforce_daily.
    pub throttled: Family<Labels, Counter>,
    /// What the provider last said is left of the account's budget, by connection: HubSpot's
    /// X-HubSpot-RateLimit-Remaining, Salesforce's daily limit less its api-usage.
    pub budget_remaining: Family<Labels, Gauge<f64, AtomicU64>>,
    /// The share of its daily API limit a Salesforce org has used, by connection.
    pub salesforce_api_usage: Family<Labels, Gauge<f64, AtomicU64>>,
}

fn step_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 150.0, 200.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("appevents");
        let events = Family::default();
        registry.register("events", "Events consumed, by outcome", events.clone());
        let unmatched = Family::default();
        registry.register(
            "unmatched_events",
            "Events acknowledged without running anything, by reason",
            unmatched.clone(),
        );
        let runs = Family::default();
        registry.register(
            "runs",
            "Workflow runs finished, by provider and outcome",
            runs.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Broker-level retries scheduled, by failure kind",
            retries.clone(),
        );
        let dead_letters = Family::default();
        registry.register(
            "dead_letters",
            "Messages dead-lettered, by reason",
            dead_letters.clone(),
        );
        let step_seconds =
            Family::<Labels, Histogram>::new_with_constructor(step_histogram as fn() -> Histogram);
        registry.register(
            "step_duration_seconds",
            "Duration of one provider step attempt",
            step_seconds.clone(),
        );
        let events_in_flight = Gauge::default();
        registry.register(
            "events_in_flight",
            "Events being processed now",
            events_in_flight.clone(),
        );
        let consumer_connected = Gauge::default();
        registry.register(
            "consumer_connected",
            "1 while the worker is connected to the broker and consuming",
            consumer_connected.clone(),
        );
        let token_refreshes = Family::default();
        registry.register(
            "token_refreshes",
            "Access token refreshes, by result",
            token_refreshes.clone(),
        );
        let ingested = Family::default();
        registry.register(
            "ingested_events",
            "Events received over HTTP, by status",
            ingested.clone(),
        );
        let payload_mismatches = Family::default();
        registry.register(
            "payload_mismatches",
            "Events whose payload does not match their app event's example, by app event",
            payload_mismatches.clone(),
        );
        let history_prunes = Family::default();
        registry.register(
            "history_prunes",
            "Passes over the run history, by result",
            history_prunes.clone(),
        );
        let history_pruned_keys = Counter::default();
        registry.register(
            "history_pruned_keys",
            "Deduplication keys of expired runs deleted",
            history_pruned_keys.clone(),
        );
        let history_pruned_partitions = Counter::default();
        registry.register(
            "history_pruned_partitions",
            "Daily partitions of expired runs dropped",
            history_pruned_partitions.clone(),
        );
        let provider_calls = Family::default();
        registry.register(
            "provider_calls",
            "Provider requests answered, by provider",
            provider_calls.clone(),
        );
        let batch_records =
            Family::<Labels, Histogram>::new_with_constructor(batch_histogram as fn() -> Histogram);
        registry.register(
            "batch_records",
            "Records per call of a provider's batch endpoint, by action",
            batch_records.clone(),
        );
        let throttle_waits =
            Family::<Labels, Histogram>::new_with_constructor(step_histogram as fn() -> Histogram);
        registry.register(
            "throttle_wait_seconds",
            "Time a run waited in process for its account's budget, by provider",
            throttle_waits.clone(),
        );
        let throttled = Family::default();
        registry.register(
            "throttled_runs",
            "Runs deferred through the broker to respect an account's limit, by provider and reason",
            throttled.clone(),
        );
        let budget_remaining = Family::default();
        registry.register(
            "rate_budget_remaining",
            "What the provider last said is left of the account's budget, by connection",
            budget_remaining.clone(),
        );
        let salesforce_api_usage = Family::default();
        registry.register(
            "salesforce_api_usage_ratio",
            "Share of its daily API limit a Salesforce org has used, by connection",
            salesforce_api_usage.clone(),
        );
        Metrics {
            provider_calls,
            batch_records: Family::clone(&batch_records),
            throttle_waits: Family::clone(&throttle_waits),
            throttled,
            budget_remaining,
            salesforce_api_usage,
            registry,
            events,
            unmatched,
            runs,
            retries,
            dead_letters,
            step_seconds: Family::clone(&step_seconds),
            events_in_flight,
            consumer_connected,
            token_refreshes,
            ingested,
            payload_mismatches,
            history_prunes,
            history_pruned_keys,
            history_pruned_partitions,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

pub fn label(key: &'static str, value: impl Into<String>) -> Labels {
    vec![(key, value.into())]
}

pub fn labels2(
    k1: &'static str,
    v1: impl Into<String>,
    k2: &'static str,
    v2: impl Into<String>,
) -> Labels {
    vec![(k1, v1.into()), (k2, v2.into())]
}
