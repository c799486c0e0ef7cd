//! Batching: one large customer's backlog, drained with batching on and off by turns. One
//! user's events with one HubSpot upsert-contact workflow (one connection), `--repeat`
//! rounds, each round measuring the broker's ceiling too. Reports events/s, the ratio to
//! the ceiling, HubSpot calls per event (counted by the stand-in), the worker's and the
//! database server's CPU and database transactions per event (issue 15's targets: at most
//! 0.02 calls per event, at least 0.35 of the ceiling).

use appevents::core::provider::Provider;
use serde_json::json;

use crate::{Bench, Drain, median, rate, spread};

const USER: &str = "bench-batch";

impl Bench {
    pub(crate) async fn batching(&self) -> anyhow::Result<()> {
        let n = self.args.events;
        println!(
            "batching: {n} events of one user, one HubSpot upsert-contact workflow, {} rounds by turns",
            self.args.repeat
        );
        println!("machine: {}", crate::machine());
        self.app_event().await?;
        let upsert = self
            .workflow(
                "bench upsert",
                Provider::Hubspot,
                "upsert-contact",
                json!({"email": "{{payload.email}}", "lastname": "{{payload.last_name}}"}),
            )
            .await?;
        self.hubspot_user(USER, upsert).await?;
        let mut ceilings = Vec::new();
        let mut batched: Vec<(Drain, f64)> = Vec::new();
        let mut single: Vec<(Drain, f64)> = Vec::new();
        for round in 0..self.args.repeat {
            ceilings.push(self.ceiling().await?.1);
            // Which goes first alternates, so neither always meets a warmer machine.
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for on in order {
                let before = self.hubspot_calls().await?;
                let drain = self.drain_with(USER, n, on).await?;
                let calls = self.hubspot_calls().await?.saturating_sub(before);
                let per_event = calls as f64 / n as f64;
                if on {
                    batched.push((drain, per_event));
                } else {
                    single.push((drain, per_event));
                }
            }
            eprintln!("round {} of {} done", round + 1, self.args.repeat);
        }
        let ceiling = median(&ceilings);
        println!(
            "{:<40} {:>10}  {:>6}  {:>10}  {:>8}  {:>8}  {:>8}  range",
            "", "median", "ratio", "calls/evt", "CPU µs", "DB µs", "xact/evt"
        );
        println!(
            "{:<40} {:>10}  {:>6}  {:>10}  {:>8}  {:>8}  {:>8}  {}",
            "ceiling: bare lapin consumer, ack each",
            rate(ceiling),
            "1.00",
            "",
            "",
            "",
            "",
            spread(&ceilings)
        );
        for (label, runs) in [
            ("batched (the default)", &batched),
            ("one record per call", &single),
        ] {
            let rates: Vec<f64> = runs.iter().map(|(d, _)| d.events_per_sec).collect();
            let calls: Vec<f64> = runs.iter().map(|(_, c)| *c).collect();
            let cpu: Vec<f64> = runs
                .iter()
                .map(|(d, _)| d.cpu_per_event.as_secs_f64() * 1e6)
                .collect();
            let transactions: Vec<f64> =
                runs.iter().map(|(d, _)| d.transactions_per_event).collect();
            let database_cpu: Vec<f64> = runs
                .iter()
                .filter_map(|(d, _)| d.database_cpu_per_event)
                .map(|cpu| cpu.as_secs_f64() * 1e6)
                .collect();
            let database_cpu = if database_cpu.is_empty() {
                "n/a".to_owned()
            } else {
                format!("{:.1}", median(&database_cpu))
            };
            let middle = median(&rates);
            println!(
                "{label:<40} {:>10}  {:>6.2}  {:>10.4}  {:>8.1}  {:>8}  {:>8.2}  {}",
                rate(middle),
                middle / ceiling,
                median(&calls),
                median(&cpu),
                database_cpu,
                median(&transactions),
                spread(&rates)
            );
        }
        Ok(())
    }

    /// HubSpot calls the stand-in has let through since it started.
    async fn hubspot_calls(&self) -> anyhow::Result<u64> {
        let counts: serde_json::Value =
            reqwest::get(format!("{}/_standin/limits", self.standin_url))
                .await?
                .json()
                .await?;
        Ok(counts["accepted"].as_u64().unwrap_or(0))
    }
}
