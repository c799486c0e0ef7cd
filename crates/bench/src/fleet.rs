//! The fleet against one limit: four workers drain one HubSpot account's backlog while the
//! stand-in limits that account on a rolling window, as HubSpot does. Reports the share of
//! calls answered 429 and the throughput against the limit (issue 15's targets: at most
//! 1 %, and within 10 % of the limit). The workers start from the default configuration and
//! learn the account's limit from the stand-in's headers, with batching off: the limit is
//! measured in calls, and this measures the limiter, one record per call.

use std::time::Duration;

use anyhow::Context;
use appevents::core::provider::Provider;
use serde_json::json;

use crate::{Bench, EVENT, stop};

impl Bench {
    pub(crate) async fn fleet(
        &self,
        calls: u32,
        interval: Duration,
        events: usize,
    ) -> anyhow::Result<()> {
        let limit_per_sec = f64::from(calls) / interval.as_secs_f64();
        println!(
            "fleet against one limit: 4 workers, {events} events, one HubSpot account limited to {calls} calls per {interval:?} ({limit_per_sec:.1}/s)"
        );
        self.app_event().await?;
        let hubspot = self
            .workflow(
                "bench hubspot",
                Provider::Hubspot,
                "create-contact",
                json!({"email": "{{payload.email}}", "lastname": "{{payload.last_name}}"}),
            )
            .await?;
        self.hubspot_user("bench-fleet", hubspot).await?;
        let client = reqwest::Client::new();
        let limits_url = format!("{}/_standin/limits", self.standin_url);
        client
            .post(&limits_url)
            .json(&json!({"hubspot": {"max": calls, "interval_ms": interval.as_millis()}}))
            .send()
            .await?
            .error_for_status()?;
        let bodies = (0..events).map(|i| {
            let id = format!("fleet-{}-{i}", self.tag);
            let body = self.body(&id, "bench-fleet", i);
            (id, body)
        });
        self.publish(&self.settings.amqp.exchange, EVENT, bodies)
            .await?;
        let mut workers = Vec::new();
        for _ in 0..4 {
            workers.push(self.start_worker_with(false).await?);
        }
        let pool = self.pool.clone();
        let wanted = i64::try_from(events)?;
        let done = crate::wait_for(
            interval.mul_f64(events as f64 / f64::from(calls) * 2.0) + Duration::from_secs(60),
            || async {
                let Ok(client) = pool.get().await else { return false };
                client
                    .query_one(
                        "select count(*) from runs where user_id = 'bench-fleet' and status = 'succeeded'",
                        &[],
                    )
                    .await
                    .ok()
                    .and_then(|row| row.try_get::<_, i64>(0).ok())
                    .is_some_and(|n| n >= wanted)
            },
        )
        .await;
        for worker in &mut workers {
            stop(&mut worker.child).await;
        }
        done.context("the fleet did not drain the backlog")?;
        let client_db = self.pool.get().await?;
        let row = client_db
            .query_one(
                "select extract(epoch from max(finished_at) - min(finished_at))::float8, \
                 sum(attempts)::bigint from runs where user_id = 'bench-fleet'",
                &[],
            )
            .await?;
        let span: f64 = row.try_get(0)?;
        let attempts: i64 = row.try_get(1)?;
        let counts: serde_json::Value = client.get(&limits_url).send().await?.json().await?;
        let accepted = counts["accepted"].as_f64().unwrap_or(0.0);
        let refused = counts["refused"].as_f64().unwrap_or(0.0);
        let throughput = (events as f64 - 1.0) / span;
        println!(
            "  throughput {throughput:.1} runs/s = {:.2} of the limit (first to last run recorded, {span:.1} s)",
            throughput / limit_per_sec
        );
        println!(
            "  calls answered 429: {refused} of {} ({:.2} %); provider calls per run {:.2}",
            accepted + refused,
            100.0 * refused / (accepted + refused).max(1.0),
            attempts as f64 / events as f64
        );
        Ok(())
    }
}

impl Bench {
    /// `user` with one HubSpot connection, subscribed to `workflow`.
    pub(crate) async fn hubspot_user(
        &self,
        user: &str,
        workflow: uuid::Uuid,
    ) -> anyhow::Result<()> {
        let connection = appevents::catalog::connections::create(
            &self.pool,
            &self.keyring,
            &appevents::catalog::connections::NewConnection {
                user_id: user.into(),
                provider: Provider::Hubspot,
                base_url: self.standin_url.clone(),
                settings: json!({}),
                access_token: Some(secrecy::SecretString::from("bench-fleet-token")),
                refresh_token: None,
                token_url: None,
                client_id: None,
                client_secret: None,
            },
        )
        .await?;
        appevents::catalog::subscriptions::create(&self.pool, user, workflow, connection).await?;
        Ok(())
    }
}
