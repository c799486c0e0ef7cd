//! `bench --console N`: the operator console's pages on an empty store, then with N runs
//! in the history (spread over 30 days and filled as `--history` fills it), served by
//! `appevents serve`'s own code in this process and asked for over HTTP with an operator's
//! session, as a browser asks.

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use secrecy::SecretString;
use tokio::sync::oneshot;

use crate::{Bench, millis};

/// Requests timed per page, after one that warms it.
const REQUESTS: usize = 20;
const OPERATOR_KEY: &str = "bench-operator-key-of-at-least-32-chars";

impl Bench {
    pub(crate) async fn console(&self, runs: i64) -> anyhow::Result<()> {
        let workflow = self.history_setup().await?;
        println!("console pages: an empty store, then {runs} runs over 30 days");
        println!("machine: {}", crate::machine());
        println!();
        let empty = self.console_figures(workflow).await?;
        let filled_in = self.fill(workflow, runs).await?;
        eprintln!("filled in {:.1} s", filled_in.as_secs_f64());
        let full = self.console_figures(workflow).await?;
        println!(
            "{:<44} {:>18} {:>22}",
            "p50 / p99 / max ms",
            "empty store",
            format!("{runs} runs")
        );
        let triple = |h: &Histogram<u64>| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                millis(h, 0.5),
                millis(h, 0.99),
                h.max() as f64 / 1000.0
            )
        };
        // The pages of one run exist on the full store only.
        for (label, b) in &full {
            let a = empty
                .iter()
                .find(|(l, _)| l == label)
                .map_or_else(|| "-".to_owned(), |(_, a)| triple(a));
            println!("{label:<44} {a:>18} {:>22}", triple(b));
        }
        Ok(())
    }

    /// Each page's response times, with the store as it is now.
    async fn console_figures(
        &self,
        workflow: uuid::Uuid,
    ) -> anyhow::Result<Vec<(String, Histogram<u64>)>> {
        let mut settings = self.settings.clone();
        settings.server.listen = "127.0.0.1:0".into();
        settings.server.api_keys = vec![SecretString::from("bench-api-key")];
        settings.console.operators =
            [("bench".to_owned(), SecretString::from(OPERATOR_KEY))].into();
        settings.console.secure_cookie = false;
        let (stop, stopped) = oneshot::channel::<()>();
        let (started, address) = oneshot::channel();
        let server = tokio::spawn(appevents::interfaces::http::run(
            settings,
            async move {
                let _ = stopped.await;
            },
            Some(started),
        ));
        let url = format!(
            "http://{}",
            address.await.context("the server did not start")?
        );
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let cookie = login(&client, &url).await?;
        let mut figures = Vec::new();
        for (label, path) in self.pages(workflow).await? {
            let mut histogram = Histogram::<u64>::new(3)?;
            for i in 0..=REQUESTS {
                let started = Instant::now();
                let response = client
                    .get(format!("{url}{path}"))
                    .header("cookie", &cookie)
                    .send()
                    .await?;
                let status = response.status();
                response.bytes().await?;
                let took = started.elapsed();
                anyhow::ensure!(status.is_success(), "{path} answered {status}");
                if i > 0 {
                    histogram.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX))?;
                }
            }
            figures.push((label, histogram));
        }
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        Ok(figures)
    }

    /// The pages measured: every console page, and the run history's filters, a deep page
    /// (half-way down the history) and a run's page.
    async fn pages(&self, workflow: uuid::Uuid) -> anyhow::Result<Vec<(String, String)>> {
        let client = self.pool.get().await?;
        let deep = client
            .query_opt(
                "select created_at, id from runs order by created_at desc, id desc \
                 offset (select count(*) / 2 from runs) limit 1",
                &[],
            )
            .await?
            .map(|row| {
                let at: time::OffsetDateTime = row.get(0);
                let id: uuid::Uuid = row.get(1);
                (format!("{}_{id}", at.unix_timestamp_nanos()), id, at)
            });
        let mut pages = vec![
            ("overview", "/console".to_owned()),
            ("runs, newest", "/console/runs".to_owned()),
            ("runs, status dead", "/console/runs?status=dead".to_owned()),
            (
                "runs, one user",
                "/console/runs?user=hist-user-42".to_owned(),
            ),
            (
                "runs, workflow and last 7 days",
                format!("/console/runs?workflow={workflow}&since=7d"),
            ),
            ("dead letters", "/console/dead-letters".to_owned()),
            ("catalog", "/console/catalog".to_owned()),
            ("audit log", "/console/audit".to_owned()),
        ];
        if let Some((cursor, id, _)) = &deep {
            pages.push((
                "runs, a page half-way down",
                format!("/console/runs?before={cursor}"),
            ));
            pages.push(("a run's page", format!("/console/runs/{id}")));
            let event: String = client
                .query_one("select event_id from runs where id = $1", &[id])
                .await?
                .get(0);
            pages.push((
                "runs, one event id",
                format!("/console/runs?event_id={event}"),
            ));
        }
        Ok(pages
            .into_iter()
            .map(|(label, path)| (label.to_owned(), path))
            .collect())
    }
}

/// Logs in as the bench operator; returns the `cookie` header of the session.
async fn login(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let form = client.get(format!("{url}/console/login")).send().await?;
    let login_cookie = first_cookie(&form).context("the login form's cookie")?;
    let body = form.text().await?;
    let marker = "name=\"csrf\" value=\"";
    let start = body.find(marker).context("the login form's token")? + marker.len();
    let csrf = &body[start..start + body[start..].find('"').context("token end")?];
    let done = client
        .post(format!("{url}/console/login"))
        .header("cookie", login_cookie)
        .form(&[("key", OPERATOR_KEY), ("csrf", csrf)])
        .send()
        .await?;
    first_cookie(&done).context("no session: the login was refused")
}

fn first_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("set-cookie")?
        .to_str()
        .ok()?
        .split(';')
        .next()
        .map(str::to_owned)
}
