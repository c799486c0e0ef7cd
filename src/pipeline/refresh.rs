//! Refreshing a connection's access token with its refresh token, once per connection
//! however many runs ask at the same time.
//!
//! In this process, runs asking for the same connection share one refresh, whose entry is
//! removed when it ends. Across processes nothing is locked while the token endpoint
//! answers: the connection is read, the endpoint called with no database connection held,
//! and the new tokens stored with a compare-and-swap on the access token the refresh
//! started from. A worker that loses the race (another refreshed, or the user reconnected
//! the account meanwhile) takes the stored token instead of its own.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::catalog::connections::{self, TokenVersion};
use crate::core::connection::{Connection, ConnectionStatus};
use crate::core::failure::{Failure, FailureKind};
use crate::integrations::{Integrations, oauth};
use crate::store::db::StoreError;
use crate::store::vault::Keyring;

/// Times a refreshed token is offered to the store when the connection keeps changing
/// under it without getting a new access token (a key rotation re-seals the same token).
const STORE_TRIES: usize = 3;

/// Refreshes access tokens: see the module's documentation.
#[derive(Default)]
pub struct Refresher {
    in_flight: SingleFlight<Uuid, Result<Connection, Failure>>,
}

impl Refresher {
    /// Returns the connection with a fresh access token. `used` is the connection as the
    /// failing call saw it: if the stored token already differs, another run refreshed it
    /// and that token is returned without calling the token endpoint again.
    pub async fn refresh(
        &self,
        pool: &Pool,
        keyring: &Arc<Keyring>,
        integrations: &Integrations,
        used: &Connection,
    ) -> Result<Connection, Failure> {
        let (pool, keyring, integrations) = (pool.clone(), keyring.clone(), integrations.clone());
        let used = used.clone();
        self.in_flight
            .run(used.id, move || async move {
                refresh(&pool, &keyring, &integrations, &used)
                    .await
                    .unwrap_or_else(|err| {
                        Err(Failure::new(
                            FailureKind::Transient,
                            format!("token refresh could not be recorded: {err}"),
                        ))
                    })
            })
            .await
            .unwrap_or_else(|| {
                Err(Failure::new(
                    FailureKind::Transient,
                    "the token refresh stopped before it ended",
                ))
            })
    }
}

/// One refresh. The outer error is the database's; the inner one the provider's.
async fn refresh(
    pool: &Pool,
    keyring: &Keyring,
    integrations: &Integrations,
    used: &Connection,
) -> Result<Result<Connection, Failure>, StoreError> {
    let (current, version) = connections::get_versioned(pool, keyring, used.id).await?;
    if let Some(settled) = settled_elsewhere(&current, used) {
        return Ok(settled);
    }
    // No database connection and no lock are held while the token endpoint answers.
    match oauth::refresh(integrations, &current).await {
        Ok(grant) => {
            let refresh_token = grant.refresh_token.or(current.refresh_token.clone());
            store(
                pool,
                keyring,
                current,
                version,
                grant.access_token,
                refresh_token,
                used,
            )
            .await
        }
        Err(failure) if failure.kind == FailureKind::RevokedCredentials => {
            let reason = failure.summary();
            if connections::mark_needs_reauth(pool, current.id, &version, &reason).await? {
                tracing::warn!(connection_id = %current.id, reason = %failure, "connection needs re-authorisation");
                return Ok(Err(failure));
            }
            // Refused because another worker refreshed first and the provider rotated the
            // refresh token: its token stands.
            let (current, _) = connections::get_versioned(pool, keyring, used.id).await?;
            Ok(settled_elsewhere(&current, used).unwrap_or(Err(failure)))
        }
        Err(failure) => Ok(Err(failure)),
    }
}

/// Stores the refreshed tokens with a compare-and-swap on `version`; when the connection
/// changed meanwhile, what happened to it decides.
async fn store(
    pool: &Pool,
    keyring: &Keyring,
    mut current: Connection,
    mut version: TokenVersion,
    access_token: SecretString,
    refresh_token: Option<SecretString>,
    used: &Connection,
) -> Result<Result<Connection, Failure>, StoreError> {
    for _ in 0..STORE_TRIES {
        let stored = connections::store_refreshed(
            pool,
            keyring,
            current.id,
            &version,
            &access_token,
            refresh_token.as_ref(),
        )
        .await?;
        if stored {
            tracing::info!(connection_id = %current.id, "access token refreshed");
            return Ok(Ok(Connection {
                access_token: Some(access_token),
                refresh_token,
                ..current
            }));
        }
        (current, version) = connections::get_versioned(pool, keyring, used.id).await?;
        if let Some(settled) = settled_elsewhere(&current, used) {
            return Ok(settled);
        }
    }
    Ok(Err(Failure::new(
        FailureKind::Transient,
        "the connection kept changing while its token was refreshed",
    )))
}

/// What the stored connection settles without a refresh of ours: it needs
/// re-authorisation, or its access token is no longer the one that failed (another worker
/// refreshed it, or the user reconnected the account).
fn settled_elsewhere(
    current: &Connection,
    used: &Connection,
) -> Option<Result<Connection, Failure>> {
    if current.status == ConnectionStatus::NeedsReauth {
        return Some(Err(current.needs_reauth()));
    }
    if !same_secret(current.access_token.as_ref(), used.access_token.as_ref()) {
        return Some(Ok(current.clone()));
    }
    None
}

fn same_secret(a: Option<&SecretString>, b: Option<&SecretString>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        (None, None) => true,
        _ => false,
    }
}

/// Calls for the same key while one is under way share its result. The work runs in its
/// own task, so it finishes (and its entry goes) even if every caller gave up waiting.
struct SingleFlight<K, V: Clone> {
    in_flight: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

/// The shared result of one run; `None` if its task died.
type Flight<V> = Shared<BoxFuture<'static, Option<V>>>;

impl<K, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            in_flight: Arc::default(),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The result of the work under way for `key`, or of `work` started now; `None` if the
    /// work's task died (it panicked).
    async fn run<F, Fut>(&self, key: K, work: F) -> Option<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let shared = {
            let mut in_flight = lock(&self.in_flight);
            in_flight
                .entry(key.clone())
                .or_insert_with(|| {
                    let entries = self.in_flight.clone();
                    let future = work();
                    // The task removes its entry once done; it waits for this lock, so the
                    // entry is in place first.
                    let task = tokio::spawn(async move {
                        let value = future.await;
                        lock(&entries).remove(&key);
                        value
                    });
                    async move { task.await.ok() }.boxed().shared()
                })
                .clone()
        };
        shared.await
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.in_flight).len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_calls_for_a_key_share_one_run_and_leave_no_entry_behind() {
        let flight = Arc::new(SingleFlight::<u32, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let calls = (0..8).map(|_| {
            let (flight, runs) = (flight.clone(), runs.clone());
            async move {
                flight
                    .run(7, move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        42
                    })
                    .await
            }
        });

        let answers = futures::future::join_all(calls).await;

        assert_eq!(answers, vec![Some(42); 8]);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for eight callers");
        assert_eq!(flight.len(), 0, "the entry goes when the run ends");
    }

    #[tokio::test]
    async fn the_entry_goes_even_when_every_caller_stopped_waiting() {
        let flight = SingleFlight::<u32, u32>::default();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let waited = tokio::time::timeout(
            Duration::from_millis(10),
            flight.run(1, move || async move {
                let _ = released.await;
                1
            }),
        )
        .await;
        assert!(waited.is_err(), "the caller gave up");
        assert_eq!(flight.len(), 1, "the run is still under way");

        let _ = release.send(());
        let gone = async {
            while flight.len() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(1), gone)
            .await
            .expect("the entry goes once the run ends");
        assert_eq!(
            flight.run(1, || async { 2 }).await,
            Some(2),
            "a later call runs anew"
        );
    }
}
