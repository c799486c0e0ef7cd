//! Run history over time: daily partitions, the deduplication keys that keep a run unique
//! across them, pruning (alone and several at once), a database migrated with its history,
//! and what a replay of an expired run does.

use std::time::Duration;

use appevents::pipeline::runs::{self, ClaimRequest, Claimed, RunRecord, RunStatus};
use appevents::store::db;
use appevents::store::history::{self, PruneOutcome, Pruned};
use appevents_standin::Faults;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::operations::salesforce_workflow;
use crate::support::{
    CONTACT_CREATED, TestApp, appevents_command, drop_database, eventually, failing_crm,
    test_settings,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

const DAY: Duration = Duration::from_secs(24 * 3600);
const LEASE: Duration = Duration::from_secs(60);
/// Claims in these tests are made by no live worker: they last their lease.
const WORKER: Uuid = Uuid::from_u128(0x1);

fn request(user: &str, event_id: &str, workflow: Uuid) -> ClaimRequest {
    ClaimRequest {
        user_id: user.into(),
        event_id: event_id.into(),
        event_name: CONTACT_CREATED.into(),
        workflow_id: workflow,
        connection_id: None,
        revive_dead: false,
    }
}

/// A run of (`user`, `event_id`, `workflow`) written as the worker writes one, `age` ago.
async fn seed_run(
    client: &impl deadpool_postgres::GenericClient,
    user: &str,
    event_id: &str,
    workflow: Uuid,
    status: &str,
    age: Duration,
) -> Uuid {
    let id = Uuid::now_v7();
    let created = OffsetDateTime::now_utc() - age;
    client
        .execute(
            "with key as (insert into run_keys (workflow_id, run_id, created_at, event_id, user_id) \
             values ($1, $2, $3, $4, $5)) \
             insert into runs (id, created_at, user_id, event_id, event_name, workflow_id, status) \
             values ($2, $3, $5, $4, $6, $1, $7)",
            &[
                &workflow,
                &id,
                &created,
                &event_id,
                &user,
                &CONTACT_CREATED,
                &status,
            ],
        )
        .await
        .expect("seed run");
    id
}

async fn counts(client: &impl deadpool_postgres::GenericClient) -> (i64, i64) {
    let row = client
        .query_one(
            "select (select count(*) from runs), (select count(*) from run_keys)",
            &[],
        )
        .await
        .expect("counts");
    (row.get(0), row.get(1))
}

/// Makes the partitions of the three days before today, as the partition function does.
async fn older_days(client: &tokio_postgres::Client) {
    history::create_partitions(client, OffsetDateTime::now_utc() - 3 * DAY)
        .await
        .expect("older partitions");
}

async fn workflow(app: &TestApp) -> Uuid {
    app.hubspot_workflow("http://127.0.0.1:9").await
}

#[tokio::test]
async fn a_run_stays_unique_across_a_partition_boundary() {
    let app = TestApp::new().await;
    let workflow = workflow(&app).await;
    let client = app.pool.get().await.expect("client");
    older_days(&client).await;
    let done = seed_run(&client, "u", "evt-done", workflow, "succeeded", 2 * DAY).await;
    let waiting = seed_run(&client, "u", "evt-wait", workflow, "retrying", 2 * DAY).await;

    // Claimed today, the runs of two days ago are found in their own day's partition.
    let claimed = runs::claim(
        &client,
        &[
            request("u", "evt-done", workflow),
            request("u", "evt-wait", workflow),
        ],
        WORKER,
        LEASE,
    )
    .await
    .expect("claim");

    assert_eq!(claimed[0], Claimed::AlreadySucceeded);
    let Claimed::Run(claim) = &claimed[1] else {
        panic!("the retrying run is claimed: {claimed:?}");
    };
    assert_eq!(claim.run_id, waiting);
    let lost = runs::record(
        &client,
        &[RunRecord {
            run_id: claim.run_id,
            created_at: claim.first_claimed_at,
            token: claim.token,
            user_id: "u".into(),
            event_id: "evt-wait".into(),
            event_name: CONTACT_CREATED.into(),
            workflow_id: workflow,
            connection_id: None,
            status: RunStatus::Succeeded,
            calls: 1,
            provider_id: Some("p-1".into()),
            last_error: None,
            next_attempt_at: None,
        }],
    )
    .await
    .expect("record");
    assert!(lost.is_empty());
    assert_eq!(
        counts(&client).await,
        (2, 2),
        "no second row, today or later"
    );
    let listed = app.runs("evt-wait").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, RunStatus::Succeeded);
    assert_ne!(done, waiting);
    app.cleanup().await;
}

fn outcome(claim: &runs::RunClaim, event_id: &str, workflow: Uuid) -> RunRecord {
    RunRecord {
        run_id: claim.run_id,
        created_at: claim.first_claimed_at,
        token: claim.token,
        user_id: "u".into(),
        event_id: event_id.into(),
        event_name: CONTACT_CREATED.into(),
        workflow_id: workflow,
        connection_id: None,
        status: RunStatus::Succeeded,
        calls: 1,
        provider_id: Some("p-1".into()),
        last_error: None,
        next_attempt_at: None,
    }
}

#[tokio::test]
async fn a_batch_s_outcomes_are_written_in_place_beside_its_claims() {
    // Arrange: 200 runs claimed in one statement, as a worker claims a batch, with event ids
    // and provider ids of the sizes real ones have; and days made by the partition function.
    let app = TestApp::new().await;
    let workflow = workflow(&app).await;
    let client = app.pool.get().await.expect("client");
    older_days(&client).await;
    let events: Vec<String> = (0..200).map(|_| Uuid::new_v4().to_string()).collect();
    let requests: Vec<ClaimRequest> = events
        .iter()
        .map(|event| request("u", event, workflow))
        .collect();
    let claimed = runs::claim(&client, &requests, WORKER, LEASE)
        .await
        .expect("claim");
    let pages = || async {
        let rows = client
            .query(
                "select id, (ctid::text::point)[0]::int8 from runs order by id",
                &[],
            )
            .await
            .expect("pages");
        rows.iter()
            .map(|row| (row.get::<_, Uuid>(0), row.get::<_, i64>(1)))
            .collect::<Vec<_>>()
    };
    let before = pages().await;

    // Act: their outcomes recorded in one statement, as a batch's are.
    let outcomes: Vec<RunRecord> = claimed
        .iter()
        .zip(&events)
        .map(|(claimed, event)| {
            let Claimed::Run(claim) = claimed else {
                panic!("a new run is claimed: {claimed:?}");
            };
            RunRecord {
                provider_id: Some("0035e00000AbCdEfGH".into()),
                ..outcome(claim, event, workflow)
            }
        })
        .collect();
    let unwritten = runs::record(&client, &outcomes).await.expect("record");

    // Assert: every run's new version is on its old page (no indexed column changes, so
    // that is an update in place, which writes no index entry); every day has the room.
    assert!(unwritten.is_empty());
    assert_eq!(before.len(), 200);
    let after = pages().await;
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    assert_eq!(after.len(), 200);
    assert_eq!(moved, 0, "{moved} of 200 outcomes moved to another page");
    let roomy = client
        .query_one(
            "select count(*) filter (where 'fillfactor=45' = any(c.reloptions)), count(*) \
             from pg_inherits i join pg_class c on c.oid = i.inhrelid \
             where i.inhparent = 'runs'::regclass",
            &[],
        )
        .await
        .expect("partitions");
    let (with_room, partitions): (i64, i64) = (roomy.get(0), roomy.get(1));
    assert!(partitions >= 10, "{partitions} partitions");
    assert_eq!(with_room, partitions);
    app.cleanup().await;
}

async fn claim_new(
    client: &impl deadpool_postgres::GenericClient,
    event_id: &str,
    workflow: Uuid,
) -> runs::RunClaim {
    let claimed = runs::claim(client, &[request("u", event_id, workflow)], WORKER, LEASE)
        .await
        .expect("claim");
    match claimed.into_iter().next() {
        Some(Claimed::Run(claim)) => claim,
        other => panic!("a new run is claimed: {other:?}"),
    }
}

async fn status_of(client: &impl deadpool_postgres::GenericClient, event_id: &str) -> Vec<String> {
    client
        .query("select status from runs where event_id = $1", &[&event_id])
        .await
        .expect("status")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn an_outcome_is_written_when_its_claim_was_lost_but_never_over_another_workers_claim() {
    let app = TestApp::new().await;
    let workflow = workflow(&app).await;
    let client = app.pool.get().await.expect("client");

    // Claims commit without waiting for the disk: a Postgres crash can lose one whose run
    // then ran. Its outcome is written all the same, with its key.
    let lost = claim_new(&client, "evt-lost", workflow).await;
    client
        .batch_execute(
            "delete from runs where event_id = 'evt-lost'; \
             delete from run_keys where event_id = 'evt-lost'",
        )
        .await
        .expect("lose the claim");
    let unwritten = runs::record(&client, &[outcome(&lost, "evt-lost", workflow)])
        .await
        .expect("record");
    assert!(unwritten.is_empty(), "{unwritten:?}");
    assert_eq!(status_of(&client, "evt-lost").await, ["succeeded"]);
    let again = runs::claim(
        &client,
        &[request("u", "evt-lost", workflow)],
        WORKER,
        LEASE,
    )
    .await
    .expect("claim again");
    assert_eq!(
        again,
        [Claimed::AlreadySucceeded],
        "its key was written too"
    );

    // A run another worker took over after this one's lease ran out keeps that worker's
    // claim, and the caller learns its outcome was not written.
    let taken = claim_new(&client, "evt-taken", workflow).await;
    client
        .execute(
            "update runs set claim_token = $1 where event_id = 'evt-taken'",
            &[&Uuid::new_v4()],
        )
        .await
        .expect("another worker's claim");
    let both = [
        outcome(&taken, "evt-taken", workflow),
        outcome(
            &claim_new(&client, "evt-mine", workflow).await,
            "evt-mine",
            workflow,
        ),
    ];
    let unwritten = runs::record(&client, &both).await.expect("record");
    assert_eq!(unwritten, [taken.run_id]);
    assert_eq!(status_of(&client, "evt-taken").await, ["running"]);
    assert_eq!(status_of(&client, "evt-mine").await, ["succeeded"]);
}

#[tokio::test]
async fn pruning_drops_whole_expired_days_and_an_expired_event_id_is_new_again() {
    let app = TestApp::new().await;
    let workflow = workflow(&app).await;
    let client = app.pool.get().await.expect("client");
    history::create_partitions(&client, OffsetDateTime::now_utc() - 40 * DAY)
        .await
        .expect("older partitions");
    let old = seed_run(&client, "u", "evt-old", workflow, "succeeded", 35 * DAY).await;
    seed_run(&client, "u", "evt-older", workflow, "dead", 38 * DAY).await;
    seed_run(&client, "u", "evt-recent", workflow, "succeeded", 5 * DAY).await;

    let outcome = history::prune(&app.settings.database, 30 * DAY)
        .await
        .expect("prune");

    let PruneOutcome::Pruned(pruned) = outcome else {
        panic!("nobody else prunes: {outcome:?}");
    };
    assert_eq!(pruned.keys, 2);
    // From 40 days ago to 31 (the day 30 days ago is partly in the window): ten days.
    assert_eq!(pruned.partitions.len(), 10, "{:?}", pruned.partitions);
    assert_eq!(counts(&client).await, (1, 1));
    let claimed = runs::claim(&client, &[request("u", "evt-old", workflow)], WORKER, LEASE)
        .await
        .expect("claim");
    let Claimed::Run(claim) = &claimed[0] else {
        panic!("an expired event id is a new event: {claimed:?}");
    };
    assert_ne!(claim.run_id, old);
    let recent = runs::claim(
        &client,
        &[request("u", "evt-recent", workflow)],
        WORKER,
        LEASE,
    )
    .await
    .expect("claim");
    assert_eq!(recent[0], Claimed::AlreadySucceeded, "within the window");
    app.cleanup().await;
}

#[tokio::test]
async fn many_pruners_at_once_drop_each_day_once_and_a_held_lock_is_skipped() {
    let app = TestApp::new().await;
    let workflow = workflow(&app).await;
    let client = app.pool.get().await.expect("client");
    history::create_partitions(&client, OffsetDateTime::now_utc() - 20 * DAY)
        .await
        .expect("older partitions");
    for age in 11..20 {
        seed_run(
            &client,
            "u",
            &format!("evt-{age}"),
            workflow,
            "succeeded",
            age * DAY,
        )
        .await;
    }
    let retention = 10 * DAY;

    let settings = &app.settings.database;
    let outcomes =
        futures::future::join_all((0..4).map(|_| history::prune(settings, retention))).await;

    let mut dropped = Vec::new();
    for outcome in outcomes {
        match outcome.expect("no pruner fails") {
            PruneOutcome::Pruned(Pruned { partitions, .. }) => dropped.extend(partitions),
            PruneOutcome::Busy => {}
        }
    }
    let before = dropped.len();
    dropped.sort();
    dropped.dedup();
    assert_eq!(before, dropped.len(), "a day dropped twice: {dropped:?}");
    assert_eq!(dropped.len(), 10, "{dropped:?}");
    assert_eq!(counts(&client).await, (0, 0));

    // While someone holds the lock, a pass does nothing and says so.
    let holder = db::connect(settings).await.expect("connect");
    holder
        .execute("select pg_advisory_lock($1)", &[&0x6170_7065_7670_726e_i64])
        .await
        .expect("lock");
    let busy = history::prune(settings, retention).await.expect("prune");
    assert_eq!(busy, PruneOutcome::Busy);
    drop(holder);
    app.cleanup().await;
}

#[tokio::test]
async fn a_database_with_history_keeps_it_when_migrated_to_partitions() {
    let settings = test_settings(&Uuid::new_v4().simple().to_string()[..12]);
    db::ensure_database(&settings.database)
        .await
        .expect("database");
    let mut client = db::connect(&settings.database).await.expect("connect");
    embedded::migrations::runner()
        .set_target(refinery::Target::Version(3))
        .run_async(&mut client)
        .await
        .expect("migrate to V3");
    client
        .batch_execute(
            "insert into app_events (id, name, schema) values \
             ('00000000-0000-0000-0000-0000000000a1', 'Contact Created', '{}'); \
             insert into workflows (id, name, app_event_id, provider, action, mapping) values \
             ('00000000-0000-0000-0000-0000000000b1', 'w', '00000000-0000-0000-0000-0000000000a1', \
              'http', 'post', '{}'); \
             insert into runs (id, event_id, workflow_id, user_id, event_name, status, created_at) \
             select gen_random_uuid(), 'evt-' || g, '00000000-0000-0000-0000-0000000000b1', \
              'user-' || (g % 7), 'Contact Created', \
              case when g = 1 then 'retrying' else 'succeeded' end, now() - g * interval '1 hour' \
             from generate_series(1, 500) g;",
        )
        .await
        .expect("history at V3");

    db::migrate(&settings.database).await.expect("migrate");

    let pool = db::pool(&settings.database).expect("pool");
    let client = pool.get().await.expect("client");
    assert_eq!(counts(&client).await, (500, 500));
    let workflow = Uuid::from_u128(0xb1);
    let claimed = runs::claim(
        &client,
        &[
            request("user-2", "evt-2", workflow),
            request("user-1", "evt-1", workflow),
        ],
        WORKER,
        LEASE,
    )
    .await
    .expect("claim");
    assert_eq!(
        claimed[0],
        Claimed::AlreadySucceeded,
        "history still dedups"
    );
    assert!(matches!(claimed[1], Claimed::Run(_)), "a retry goes on");
    assert_eq!(counts(&client).await, (500, 500));
    let user_runs = runs::list(
        &pool,
        &runs::RunFilter {
            user_id: Some("user-3".into()),
            before: None,
            limit: 1000,
            ..runs::RunFilter::default()
        },
    )
    .await
    .expect("list");
    assert_eq!(user_runs.len(), 72);
    drop(client);
    pool.close();
    drop_database(&settings).await;
}

#[tokio::test]
async fn a_replayed_dead_letter_of_an_expired_run_runs_as_a_new_event() {
    let crm = failing_crm(503).await;
    let mut app = TestApp::new().await;
    app.app_event(CONTACT_CREATED).await;
    salesforce_workflow(&app, &crm.url(), "u").await;
    app.start_worker().await;
    let id = app
        .publish(CONTACT_CREATED, "u", json!({"last_name": "Expired"}), None)
        .await;
    let dead = app.wait_for_runs(&id, 1, RunStatus::Dead).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.dead_letter_ids().await.len() == 1
        })
        .await
    );
    // The worker's own pass at start-up is counted.
    assert!(
        app.metrics()
            .await
            .contains("appevents_history_prunes_total{result=\"pruned\"} 1")
    );

    // The dead run ages past the retention and the cron command prunes it.
    let client = app.pool.get().await.expect("client");
    history::create_partitions(&client, OffsetDateTime::now_utc() - 41 * DAY)
        .await
        .expect("older partitions");
    client
        .batch_execute(
            "update runs set created_at = created_at - interval '40 days'; \
             update run_keys set created_at = created_at - interval '40 days';",
        )
        .await
        .expect("age the run");
    let output = appevents_command(&app.settings, &["history", "prune"])
        .output()
        .await
        .expect("history prune");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}");
    assert!(out.contains("1 keys deleted"), "{out}");
    assert!(app.runs(&id).await.is_empty());

    // Replayed, the letter is a new event: a new run, executed, the CRM fixed by now.
    crm.standin.set_faults(Faults::default());
    let replay = appevents_command(&app.settings, &["dlq", "replay"])
        .output()
        .await
        .expect("replay");
    assert!(replay.status.success());
    let runs = app.wait_for_runs(&id, 1, RunStatus::Succeeded).await;
    assert_eq!(runs.len(), 1);
    assert_ne!(runs[0].id, dead[0].id);
    assert_eq!(crm.standin.records().len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_worker_refuses_a_retention_shorter_than_a_run_can_take() {
    let settings = test_settings(&Uuid::new_v4().simple().to_string()[..12]);

    // The test schedule: two retries of up to 400 ms, then per try (three) the run timeout of
    // 90 s and a lease of 5 s.
    let output = appevents_command(&settings, &["worker"])
        .env("APPEVENTS__HISTORY__RETENTION", "10s")
        .output()
        .await
        .expect("run the worker");

    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("history.retention (10s)"), "{err}");
    assert!(err.contains("4m 45s 800ms"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

/// The plan `client`'s session makes of `statement` for any parameters, as EXPLAIN prints
/// it. `generic`: have the session make one plan for all parameters first; the run
/// statements' pools do so by themselves, as a worker's prepared statements there are.
async fn plan(client: &tokio_postgres::Client, statement: &str, generic: bool) -> String {
    let params = statement
        .split('$')
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<usize>().ok()
        })
        .max()
        .unwrap_or(0);
    let nulls = vec!["null"; params].join(", ");
    if generic {
        client
            .batch_execute("set plan_cache_mode = force_generic_plan")
            .await
            .expect("set");
    }
    client
        .batch_execute(&format!("prepare hot as {statement}"))
        .await
        .expect("prepare");
    let lines = client
        .simple_query(&format!("explain execute hot({nulls})"))
        .await
        .expect("explain");
    client
        .batch_execute("deallocate hot")
        .await
        .expect("deallocate");
    lines
        .iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the plan reads a run table (runs, a partition, the keys, the workers) other than
/// through an index probe with a condition: a sequential scan, or an index read whole.
fn reads_a_run_table_whole(plan: &str) -> bool {
    let lines: Vec<&str> = plan.lines().map(str::trim).collect();
    lines.iter().enumerate().any(|(i, line)| {
        let scan = line.trim_start_matches("->").trim();
        let on_run_table = [" on run", " on workers"].iter().any(|t| scan.contains(t));
        if !scan.contains("Scan") || !on_run_table {
            return false;
        }
        let probe =
            scan.starts_with("Index Scan using") || scan.starts_with("Index Only Scan using");
        let conditioned = lines
            .get(i + 1)
            .is_some_and(|next| next.starts_with("Index Cond:"));
        !(probe && conditioned)
    })
}

#[tokio::test]
async fn the_run_statements_find_their_rows_by_key_on_a_new_database() {
    // A new database: its runs and keys are empty and were never analysed, as are a new
    // day's partition's. A plan made now is the plan a worker's session keeps.
    let app = TestApp::new().await;
    let claims = db::claims_pool(&app.settings.database).expect("claims pool");
    let records = db::records_pool(&app.settings.database).expect("records pool");
    let claims = claims.get().await.expect("claims client");
    let records = records.get().await.expect("records client");
    for statement in runs::HOT_STATEMENTS {
        for client in [&claims, &records] {
            let plan = plan(client, statement, false).await;
            assert!(
                plan.contains("Index Cond") && !reads_a_run_table_whole(&plan),
                "a run statement reads a table whole:\n{statement}\n{plan}"
            );
        }
    }
    // A default session would: given one plan for all parameters, on tables it believes
    // small, the outcome's update reads every run of every partition to find the few it
    // writes.
    let plain = db::connect(&app.settings.database).await.expect("connect");
    let mut whole = 0;
    for statement in runs::HOT_STATEMENTS {
        if reads_a_run_table_whole(&plan(&plain, statement, true).await) {
            whole += 1;
        }
    }
    assert!(whole > 0, "a default session found every run by key too");
}
