//! `appevents worker`: the worker process, wired together. It applies migrations (waiting
//! for the database), serves the ops endpoints, keeps the resolver's change listener up,
//! prunes expired run history now and then, and runs the consume loop until `shutdown`
//! resolves.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::interfaces::ops::{self, OpsState};
use crate::observe::metrics::Metrics;
use crate::pipeline::consume;
use crate::pipeline::context::Context;
use crate::store::vault::Keyring;
use crate::store::{db, history};

/// A running worker's handles, for the binary and for tests.
pub struct Running {
    pub context: Arc<Context>,
    pub ops_addr: std::net::SocketAddr,
}

/// Runs a worker until `shutdown` resolves: migrate, serve the ops endpoints, consume.
/// On shutdown it stops consuming, lets in-flight events finish within the grace period,
/// hands the rest back, and returns.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: Option<tokio::sync::oneshot::Sender<Running>>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    let keyring = Arc::new(Keyring::from_settings(&settings.secrets)?);
    // Bound first, so a taken port fails at once rather than after the database wait; served
    // once the worker is ready to answer.
    let ops_listen = &settings.worker.ops_listen;
    let listener = tokio::net::TcpListener::bind(ops_listen)
        .await
        .with_context(|| format!("cannot listen on {ops_listen} (worker.ops_listen)"))?;

    let pool = db::pool(&settings.database)?;
    db::migrate_when_ready(&settings.database, &stop).await?;
    let metrics = Arc::new(Metrics::new());
    let context = Arc::new(Context::new(&settings, pool, keyring, metrics.clone())?);
    // Alive before the first claim, renewed until everything in flight is finished or
    // handed back.
    let liveness = context.liveness.clone();
    let liveness_stop = abort.clone();
    let liveness_task = tokio::spawn(async move { liveness.keep_alive(liveness_stop).await });

    let ops_addr = listener.local_addr()?;
    let router = ops::router(OpsState {
        metrics,
        health: context.health.clone(),
    });
    let ops_stop = abort.clone();
    let ops_task = tokio::spawn(ops::serve(listener, router, async move {
        ops_stop.cancelled().await
    }));
    // Built once: the change listener reconnects without reading the TLS roots again.
    let listen_config = db::pg_config(settings.database_url())?;
    let listen_transport = db::transport(&settings.database)?;
    let listen_stop = abort.clone();
    let listener_task = tokio::spawn(context.resolver.clone().listen(
        listen_config,
        listen_transport,
        listen_stop,
    ));
    if let Some(started) = started {
        let _ = started.send(Running {
            context: context.clone(),
            ops_addr,
        });
    }
    let history_task = tokio::spawn(history::maintain(
        settings.database.clone(),
        settings.history.clone(),
        context.metrics.clone(),
        abort.clone(),
    ));
    settings.warn_if_development_key();
    tracing::info!(
        queue = %context.topology.queue,
        %ops_addr,
        worker_id = %context.liveness.worker_id,
        configuration = %settings.read_from.join("; "),
        "worker started"
    );

    consume::consume(&context, &settings, &stop, &abort).await;
    abort.cancel();
    let _ = liveness_task.await;
    // What this worker handed back may be taken over at once, without waiting for the lease.
    if let Err(err) = context.liveness.retire().await {
        tracing::warn!(error = %err, "could not end the worker's claims; they lapse with the lease");
    }
    let _ = listener_task.await;
    let _ = history_task.await;
    let _ = ops_task.await;
    tracing::info!("worker stopped");
    Ok(())
}
