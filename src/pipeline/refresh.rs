//! Refreshing a connection's access token with its refresh token, once per connection
//! however many runs ask at the same time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::catalog::connections;
use crate::core::connection::{Connection, ConnectionStatus};
use crate::core::failure::{Failure, FailureKind};
use crate::integrations::{Integrations, oauth};
use crate::store::db::StoreError;
use crate::store::vault::Keyring;

/// Refreshes access tokens, once per connection however many runs ask at the same time:
/// a lock per connection in this process, and the row lock across processes.
#[derive(Default)]
pub struct Refresher {
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

impl Refresher {
    /// Returns the connection with a fresh access token. `used` is the connection as the
    /// failing call saw it: if the stored token already differs, another run refreshed it
    /// and that token is returned without calling the token endpoint again.
    pub async fn refresh(
        &self,
        pool: &Pool,
        keyring: &Keyring,
        integrations: &Integrations,
        used: &Connection,
    ) -> Result<Connection, Failure> {
        let lock = self.lock_for(used.id);
        let _guard = lock.lock().await;
        self.refresh_locked(pool, keyring, integrations, used)
            .await
            .unwrap_or_else(|err| {
                Err(Failure::new(
                    FailureKind::Transient,
                    format!("token refresh could not be recorded: {err}"),
                ))
            })
    }

    fn lock_for(&self, id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(id).or_default().clone()
    }

    /// The outer error is the database's; the inner one the provider's.
    async fn refresh_locked(
        &self,
        pool: &Pool,
        keyring: &Keyring,
        integrations: &Integrations,
        used: &Connection,
    ) -> Result<Result<Connection, Failure>, StoreError> {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                &format!(
                    "select {} from connections c where c.id = $1 for update",
                    connections::COLUMNS
                ),
                &[&used.id],
            )
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("connection {} was deleted", used.id)))?;
        let current = connections::from_row(&row, 0, keyring)?;
        if current.status == ConnectionStatus::NeedsReauth {
            return Ok(Err(current.needs_reauth()));
        }
        if !same_secret(current.access_token.as_ref(), used.access_token.as_ref()) {
            tx.commit().await?;
            return Ok(Ok(current));
        }
        match oauth::refresh(integrations, &current).await {
            Ok(grant) => {
                let refresh_token = grant.refresh_token.or(current.refresh_token.clone());
                tx.execute(
                    "update connections set access_token = $2, refresh_token = $3, \
                     token_refreshed_at = now(), updated_at = now() where id = $1",
                    &[
                        &current.id,
                        &connections::seal(
                            keyring,
                            current.id,
                            "access_token",
                            Some(&grant.access_token),
                        )?,
                        &connections::seal(
                            keyring,
                            current.id,
                            "refresh_token",
                            refresh_token.as_ref(),
                        )?,
                    ],
                )
                .await?;
                tx.commit().await?;
                tracing::info!(connection_id = %current.id, "access token refreshed");
                Ok(Ok(Connection {
                    access_token: Some(grant.access_token),
                    refresh_token,
                    ..current
                }))
            }
            Err(failure) if failure.kind == FailureKind::RevokedCredentials => {
                tx.execute(
                    "update connections set status = 'needs_reauth', status_reason = $2, \
                     updated_at = now() where id = $1",
                    &[&current.id, &failure.summary()],
                )
                .await?;
                tx.commit().await?;
                tracing::warn!(connection_id = %current.id, reason = %failure, "connection needs re-authorisation");
                Ok(Err(failure))
            }
            Err(failure) => Ok(Err(failure)),
        }
    }
}

fn same_secret(a: Option<&SecretString>, b: Option<&SecretString>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        (None, None) => true,
        _ => false,
    }
}
