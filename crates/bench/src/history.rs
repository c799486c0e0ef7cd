//! `bench --history N`: the run store after a month, beside the same figures on an empty store
//! in the same run. Two databases: one stays empty, the other gets N synthetic runs spread
//! over the 30 whole UTC days before today, generated in Postgres (`generate_series`, a day per
//! statement, the indexes built after). Then both are measured by turns, `--repeat` rounds, so
//! that the machine's other work weighs on both alike: claim and record latency (one run per
//! statement, as a lone event is), the drain rate with one workflow, `runs list` by user and by
//! status; and last the time to drop the oldest day (its partition and its keys) while claims
//! go on, with their latency during the drop.

use std::time::{Duration, Instant};

use anyhow::Context;
use appevents::pipeline::runs::{self, ClaimRequest, Claimed, RunFilter, RunRecord, RunStatus};
use appevents::store::db;
use appevents::store::history::{self, PruneOutcome};
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;

use crate::{Bench, EVENT, millis, rate};

const DAYS: i32 = 30;
/// Users the synthetic history is spread over: each has N / USERS runs.
const USERS: i32 = 10_000;
/// Claims (and records) timed per measurement.
const SAMPLES: usize = 2_000;
/// Listings timed per measurement.
const LISTINGS: usize = 20;
/// Every this many synthetic runs one is dead, with an error.
const DEAD_EVERY: i32 = 500;

/// The figures of one store, over every round.
struct Figures {
    claim: Histogram<u64>,
    record: Histogram<u64>,
    drains: Vec<f64>,
    by_user: Histogram<u64>,
    by_dead: Histogram<u64>,
    by_succeeded: Histogram<u64>,
}

impl Figures {
    fn new() -> anyhow::Result<Figures> {
        Ok(Figures {
            claim: Histogram::new(3)?,
            record: Histogram::new(3)?,
            drains: Vec::new(),
            by_user: Histogram::new(3)?,
            by_dead: Histogram::new(3)?,
            by_succeeded: Histogram::new(3)?,
        })
    }

    fn median_drain(&self) -> f64 {
        let mut drains = self.drains.clone();
        drains.sort_by(f64::total_cmp);
        drains.get(drains.len() / 2).copied().unwrap_or(0.0)
    }
}

impl Bench {
    /// `self` is the store that gets the history, `empty` the one that stays empty.
    pub(crate) async fn history(&self, empty: &Bench, runs: i64) -> anyhow::Result<()> {
        let empty_workflow = empty.history_setup().await?;
        let workflow = self.history_setup().await?;
        let n = self.args.events;
        let rounds = self.args.repeat.max(1);
        println!(
            "run history: {runs} runs over {DAYS} days beside an empty store, measured by turns in {rounds} round(s); drains of {n} events"
        );
        println!("machine: {}", crate::machine());
        println!();
        let filled_in = self.fill(workflow, runs).await?;
        let (runs_bytes, keys_bytes) = self.bytes_per_run().await?;
        println!(
            "filled {runs} runs in {:.1} s: {runs_bytes:.0} B per run in runs, {keys_bytes:.0} B in run_keys (tables and indexes)",
            filled_in.as_secs_f64()
        );
        let mut empty_figures = Figures::new()?;
        let mut full = Figures::new()?;
        for round in 0..rounds {
            empty
                .history_figures(
                    empty_workflow,
                    &format!("empty-{round}"),
                    &mut empty_figures,
                )
                .await?;
            self.history_figures(workflow, &format!("full-{round}"), &mut full)
                .await?;
            eprintln!("round {} of {rounds} measured", round + 1);
        }
        let (empty_drop, empty_during) = empty.drop_oldest_day(empty_workflow).await?;
        let (full_drop, full_during) = self.drop_oldest_day(workflow).await?;

        println!();
        println!(
            "{:<34} {:>22} {:>22} {:>8}",
            "",
            "empty store",
            format!("{runs} runs"),
            "ratio"
        );
        let pair = |h: &Histogram<u64>| format!("{:.2} / {:.2}", millis(h, 0.5), millis(h, 0.99));
        let ratio = |a: &Histogram<u64>, b: &Histogram<u64>| millis(b, 0.99) / millis(a, 0.99);
        for (label, a, b) in [
            ("claim, p50 / p99 ms", &empty_figures.claim, &full.claim),
            ("record, p50 / p99 ms", &empty_figures.record, &full.record),
            (
                "runs list --user, p50 / p99 ms",
                &empty_figures.by_user,
                &full.by_user,
            ),
            (
                "runs list --status dead",
                &empty_figures.by_dead,
                &full.by_dead,
            ),
            (
                "runs list --status succeeded",
                &empty_figures.by_succeeded,
                &full.by_succeeded,
            ),
        ] {
            println!(
                "{label:<34} {:>22} {:>22} {:>8.2}",
                pair(a),
                pair(b),
                ratio(a, b)
            );
        }
        println!(
            "{:<34} {:>22} {:>22} {:>8.2}",
            "drain, 1 workflow (median)",
            rate(empty_figures.median_drain()),
            rate(full.median_drain()),
            full.median_drain() / empty_figures.median_drain()
        );
        let each = |f: &Figures| {
            f.drains
                .iter()
                .map(|d| format!("{d:.0}"))
                .collect::<Vec<_>>()
                .join(" · ")
        };
        println!(
            "{:<34} {:>22} {:>22}",
            "drain, each round",
            each(&empty_figures),
            each(&full)
        );
        println!();
        for (store, dropped, during) in [
            ("empty store", empty_drop, empty_during),
            ("full store", full_drop, full_during),
        ] {
            println!(
                "drop the oldest day, {store}: {} in {:.2} s; {} claims meanwhile, p99 {:.2} ms, max {:.2} ms",
                dropped.0,
                dropped.1.as_secs_f64(),
                during.len(),
                millis(&during, 0.99),
                during.max() as f64 / 1000.0
            );
        }
        Ok(())
    }

    /// The workflow the synthetic history and the drains use; one user subscribed to it.
    pub(crate) async fn history_setup(&self) -> anyhow::Result<uuid::Uuid> {
        self.app_event().await?;
        let workflow = self
            .workflow(
                "bench salesforce",
                appevents::core::provider::Provider::Salesforce,
                "create",
                serde_json::json!({"LastName": "{{payload.last_name}}"}),
            )
            .await?;
        self.user("bench-1", &[workflow]).await?;
        let client = self.pool.get().await?;
        let from = time::OffsetDateTime::now_utc() - Duration::from_secs(86_400 * DAYS as u64);
        history::create_partitions(&client, from).await?;
        Ok(workflow)
    }

    /// Generates `runs` runs over the 30 whole days before today, a day per statement, in
    /// time order (as workers write them), with their keys; then vacuums and analyzes both.
    /// The indexes and constraints of both tables are dropped for the fill and made again
    /// from their own definitions after it: one sorted build each instead of 50 million
    /// random insertions, the same store in the end.
    pub(crate) async fn fill(&self, workflow: uuid::Uuid, runs: i64) -> anyhow::Result<Duration> {
        let started = Instant::now();
        // A connection of its own: the settings below are for the fill alone.
        let client = db::connect(&self.settings.database).await?;
        client
            .batch_execute(
                "set maintenance_work_mem = '1GB'; set synchronous_commit = off; \
                 set max_parallel_maintenance_workers = 2",
            )
            .await?;
        let rebuild = IndexDefinitions::drop_from(&client, &["runs", "run_keys"]).await?;
        let per_day = i32::try_from(runs / i64::from(DAYS)).context("too many runs per day")?;
        for day in (1..=DAYS).rev() {
            client
                .execute(
                    "with made as (insert into runs (id, created_at, updated_at, finished_at, \
                     user_id, event_id, event_name, workflow_id, status, attempts, claims, \
                     provider_id, last_error) \
                     select gen_random_uuid(), t, t, t, 'hist-user-' || (i % $4), \
                     md5($1::text || '-' || i::text)::uuid::text, $5, $2, \
                     case when i % $6 = 0 then 'dead' else 'succeeded' end, 1, 1, \
                     case when i % $6 <> 0 then '003' || lpad(i::text, 15, '0') end, \
                     case when i % $6 = 0 then '{\"kind\":\"permanent\",\"status\":400,\
                     \"message\":\"REQUIRED_FIELD_MISSING: Required fields are missing\"}'::jsonb end \
                     from (select i, date_trunc('day', now(), 'UTC') - make_interval(days => $1) \
                     + i * (interval '1 day' / $3) as t from generate_series(0, $3 - 1) i) g \
                     returning id, created_at, event_id, user_id, workflow_id) \
                     insert into run_keys (workflow_id, run_id, created_at, event_id, user_id) \
                     select workflow_id, id, created_at, event_id, user_id from made",
                    &[&day, &workflow, &per_day, &USERS, &EVENT, &DEAD_EVERY],
                )
                .await?;
            eprintln!(
                "filled day -{day} ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
        rebuild.make(&client).await?;
        eprintln!("indexes built ({:.0} s)", started.elapsed().as_secs_f64());
        // A month-old store has been vacuumed and analyzed by autovacuum long since; the
        // checkpoint writes the fill out before anything is timed.
        for statement in [
            "vacuum (analyze) runs",
            "vacuum (analyze) run_keys",
            "checkpoint",
        ] {
            client.batch_execute(statement).await?;
        }
        Ok(started.elapsed())
    }

    /// One round's figures of this store, added to `figures`.
    async fn history_figures(
        &self,
        workflow: uuid::Uuid,
        phase: &str,
        figures: &mut Figures,
    ) -> anyhow::Result<()> {
        let (claim, record) = self.claim_and_record(workflow, phase).await?;
        figures.claim.add(&claim)?;
        figures.record.add(&record)?;
        figures.drains.push(
            self.drain("bench-1", self.args.events)
                .await?
                .events_per_sec,
        );
        figures.by_user.add(
            &self
                .listing(|f| f.user_id = Some("hist-user-4242".into()))
                .await?,
        )?;
        figures
            .by_dead
            .add(&self.listing(|f| f.status = Some(RunStatus::Dead)).await?)?;
        figures.by_succeeded.add(
            &self
                .listing(|f| f.status = Some(RunStatus::Succeeded))
                .await?,
        )?;
        Ok(())
    }

    /// One new run claimed, then recorded as succeeded, `SAMPLES` times: each statement timed.
    async fn claim_and_record(
        &self,
        workflow: uuid::Uuid,
        phase: &str,
    ) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
        let claims_pool = db::claims_pool(&self.settings.database)?;
        let claimer = claims_pool.get().await?;
        let recorder = self.pool.get().await?;
        let mut claim_times = Histogram::<u64>::new(3)?;
        let mut record_times = Histogram::<u64>::new(3)?;
        for i in 0..SAMPLES {
            let request = request(workflow, format!("latency-{phase}-{i}"));
            let started = Instant::now();
            let claimed =
                runs::claim(&claimer, std::slice::from_ref(&request), WORKER, LEASE).await?;
            claim_times.record(micros(started.elapsed()))?;
            let Some(Claimed::Run(claim)) = claimed.into_iter().next() else {
                anyhow::bail!("a new run was not claimed");
            };
            let outcome = RunRecord {
                run_id: claim.run_id,
                created_at: claim.first_claimed_at,
                token: claim.token,
                user_id: request.user_id,
                event_id: request.event_id,
                event_name: request.event_name,
                workflow_id: workflow,
                connection_id: None,
                status: RunStatus::Succeeded,
                calls: 1,
                provider_id: Some("003000000000000AAA".into()),
                last_error: None,
                next_attempt_at: None,
            };
            let started = Instant::now();
            runs::record(&recorder, std::slice::from_ref(&outcome)).await?;
            record_times.record(micros(started.elapsed()))?;
        }
        claims_pool.close();
        Ok((claim_times, record_times))
    }

    /// The newest 50 runs matching a filter, `LISTINGS` times.
    async fn listing(&self, filter: impl Fn(&mut RunFilter)) -> anyhow::Result<Histogram<u64>> {
        let mut times = Histogram::<u64>::new(3)?;
        let mut query = RunFilter {
            before: None,
            limit: 50,
            ..RunFilter::default()
        };
        filter(&mut query);
        for _ in 0..LISTINGS {
            let started = Instant::now();
            runs::list(&self.pool, &query).await?;
            times.record(micros(started.elapsed()))?;
        }
        Ok(times)
    }

    /// Drops the oldest generated day (its partition and its keys) while one client claims
    /// new runs without pause. Returns what was dropped and how long it took, and the claims'
    /// latency during the drop.
    async fn drop_oldest_day(
        &self,
        workflow: uuid::Uuid,
    ) -> anyhow::Result<((String, Duration), Histogram<u64>)> {
        let client = self.pool.get().await?;
        // The cutoff at the end of the oldest day: it alone expires.
        let retention: f64 = client
            .query_one(
                "select extract(epoch from now() - (date_trunc('day', now(), 'UTC') \
                 - make_interval(days => $1)))::float8",
                &[&(DAYS - 1)],
            )
            .await?
            .try_get(0)?;
        let stop = CancellationToken::new();
        let claims = tokio::spawn(claim_until(
            self.settings.database.clone(),
            workflow,
            stop.clone(),
        ));
        // Let the claimer get going before the drop starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let outcome =
            history::prune(&self.settings.database, Duration::from_secs_f64(retention)).await?;
        let took = started.elapsed();
        stop.cancel();
        let during = claims.await??;
        let PruneOutcome::Pruned(pruned) = outcome else {
            anyhow::bail!("another process was pruning the bench database");
        };
        Ok((
            format!(
                "{} partition(s) and {} keys",
                pruned.partitions.len(),
                pruned.keys
            ),
            took,
        ))
        .map(|dropped| (dropped, during))
    }

    async fn bytes_per_run(&self) -> anyhow::Result<(f64, f64)> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "select (select sum(pg_total_relation_size(i.inhrelid)) from pg_inherits i \
                 where i.inhparent = 'runs'::regclass)::float8 / greatest(count(*), 1), \
                 pg_total_relation_size('run_keys')::float8 / greatest(count(*), 1) from run_keys",
                &[],
            )
            .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }
}

const LEASE: Duration = Duration::from_secs(120);
/// The measuring claims are made by no live worker: they last their lease.
const WORKER: uuid::Uuid = uuid::Uuid::from_u128(0x1);

fn request(workflow: uuid::Uuid, event_id: String) -> ClaimRequest {
    ClaimRequest {
        user_id: "hist-user-4242".into(),
        event_id,
        event_name: EVENT.into(),
        workflow_id: workflow,
        connection_id: None,
        revive_dead: false,
    }
}

/// Claims new runs one at a time until `stop`; their latencies.
async fn claim_until(
    database: appevents::config::DatabaseSettings,
    workflow: uuid::Uuid,
    stop: CancellationToken,
) -> anyhow::Result<Histogram<u64>> {
    let pool = db::claims_pool(&database)?;
    let client = pool.get().await?;
    let phase = uuid::Uuid::new_v4().simple().to_string();
    let mut times = Histogram::<u64>::new(3)?;
    let mut i = 0u64;
    while !stop.is_cancelled() {
        let request = request(workflow, format!("during-drop-{phase}-{i}"));
        let started = Instant::now();
        runs::claim(&client, std::slice::from_ref(&request), WORKER, LEASE).await?;
        times.record(micros(started.elapsed()))?;
        i += 1;
    }
    Ok(times)
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The indexes and constraints of some tables, as Postgres prints their definitions.
struct IndexDefinitions {
    /// `alter table … add constraint …`, after the indexes.
    constraints: Vec<String>,
    /// `create index …` of the indexes no constraint owns.
    indexes: Vec<String>,
}

impl IndexDefinitions {
    /// Reads the definitions of the tables' primary keys, foreign keys and other indexes, then
    /// drops them (a partitioned table's go from every partition with it).
    async fn drop_from(
        client: &tokio_postgres::Client,
        tables: &[&str],
    ) -> anyhow::Result<IndexDefinitions> {
        let tables: Vec<String> = tables.iter().map(|t| (*t).to_owned()).collect();
        let mut constraints = Vec::new();
        let mut drops = Vec::new();
        for row in client
            .query(
                "select c.conrelid::regclass::text, c.conname::text, pg_get_constraintdef(c.oid) \
                 from pg_constraint c join pg_class t on t.oid = c.conrelid \
                 where t.relname = any($1) and t.relnamespace = current_schema()::regnamespace \
                 and c.contype in ('p', 'u', 'f') and c.conparentid = 0 \
                 order by c.contype = 'f'",
                &[&tables],
            )
            .await?
        {
            let (table, name, definition): (String, String, String) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            constraints.push(format!(
                "alter table {table} add constraint \"{name}\" {definition}"
            ));
            drops.push(format!("alter table {table} drop constraint \"{name}\""));
        }
        // Foreign keys first when dropping: a primary key may be what one refers to.
        drops.reverse();
        let mut indexes = Vec::new();
        for row in client
            .query(
                "select i.indexname::text, i.indexdef from pg_indexes i \
                 where i.tablename = any($1) and i.schemaname = current_schema() \
                 and not exists (select 1 from pg_constraint c \
                 where c.conindid = (quote_ident(i.schemaname) || '.' || quote_ident(i.indexname))::regclass)",
                &[&tables],
            )
            .await?
        {
            let (name, definition): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            // A partitioned table's index prints as `ON ONLY`, which would make it for the
            // parent alone: made again, it is made for every partition.
            indexes.push(definition.replacen(" ON ONLY ", " ON ", 1));
            drops.push(format!("drop index \"{name}\""));
        }
        for statement in &drops {
            client.batch_execute(statement).await?;
        }
        Ok(IndexDefinitions {
            constraints,
            indexes,
        })
    }

    async fn make(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
        for statement in self.indexes.iter().chain(&self.constraints) {
            client
                .batch_execute(statement)
                .await
                .with_context(|| format!("rebuild: {statement}"))?;
        }
        Ok(())
    }
}
