//! `appevents migrate`: create the database if missing, apply the migrations, declare the
//! broker's topology (the exchange, the work, retry and dead-letter queues and their
//! bindings). Publishers declare nothing; workers declare the same topology when they start.

use anyhow::anyhow;

use crate::config::Settings;
use crate::store::db;
use crate::transport::broker::{self, Recovery};
use crate::transport::topology::Topology;

pub(super) async fn run(settings: &Settings) -> anyhow::Result<()> {
    migrate_database(settings).await?;
    declare_topology(settings).await?;
    println!(
        "broker topology declared (exchange {}, queue {})",
        settings.amqp.exchange, settings.amqp.queue
    );
    Ok(())
}

/// Declares the topology a worker consumes from, so events published before any worker ran
/// are queued. Idempotent.
pub(super) async fn declare_topology(settings: &Settings) -> anyhow::Result<()> {
    let url = settings.amqp_url();
    let failed = |err: lapin::Error| anyhow!(broker::connect_failure(url, &err));
    let connection = broker::connect(
        url,
        &settings.amqp.tls_ca_file,
        "appevents migrate",
        Recovery::None,
    )
    .await
    .map_err(failed)?;
    Topology::new(&settings.amqp, &settings.retry.schedule)
        .declare(&connection)
        .await
        .map_err(|err| {
            anyhow!(
                "declaring the broker topology: {}",
                crate::observe::errors::report(&err)
            )
        })?;
    let _ = connection.close(200, "declared".into()).await;
    Ok(())
}

async fn migrate_database(settings: &Settings) -> anyhow::Result<()> {
    if db::ensure_database(&settings.database).await? {
        println!(
            "created database {}",
            db::pg_config(settings.database_url())?
                .get_dbname()
                .unwrap_or("?")
        );
    }
    let applied = db::migrate(&settings.database).await?;
    if applied.is_empty() {
        println!("schema is up to date");
    }
    for name in applied {
        println!("applied {name}");
    }
    Ok(())
}
