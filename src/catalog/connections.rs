//! Connections in Postgres: one user's credentials for one provider account. Secrets are
//! sealed by the vault before they reach Postgres and opened only in memory (into a
//! [`Connection`]).

use deadpool_postgres::{GenericClient, Pool};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::config::rate_limit::RateLimit;
use crate::core::connection::{Connection, ConnectionStatus};
use crate::core::provider::Provider;
use crate::store::db::StoreError;
use crate::store::vault::{Keyring, VaultError};

/// What listings show: everything but the secrets, and which secrets are set.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionSummary {
    pub id: Uuid,
    pub user_id: String,
    pub provider: Provider,
    pub base_url: String,
    pub settings: Value,
    pub has_access_token: bool,
    pub has_refresh_token: bool,
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub status: ConnectionStatus,
    pub status_reason: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub token_refreshed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The connection's own rate limit ("100/10s"), overriding its provider's default.
    pub rate_limit: Option<String>,
    /// The limit the provider reported for the account (HubSpot's headers).
    pub learned_rate_limit: Option<String>,
    /// What the provider last said is left: HubSpot's X-HubSpot-RateLimit-Remaining.
    pub rate_limit_remaining: Option<i32>,
    /// Salesforce's daily usage as last seen, "used/max".
    pub api_usage: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub limits_observed_at: Option<OffsetDateTime>,
}

/// The fields of a new connection, or the credentials that replace a connection's.
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub user_id: String,
    pub provider: Provider,
    pub base_url: String,
    pub settings: Value,
    pub access_token: Option<SecretString>,
    pub refresh_token: Option<SecretString>,
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
}

/// The columns `from_row` reads, for queries that join connections (`resolve.rs`).
pub const COLUMNS: &str = "c.id, c.user_id, c.provider, c.base_url, c.settings, c.access_token, \
     c.refresh_token, c.token_url, c.client_id, c.client_secret, c.status, c.status_reason";

fn context(id: Uuid, column: &str) -> String {
    format!("connection/{id}/{column}")
}

fn seal(
    keyring: &Keyring,
    id: Uuid,
    column: &str,
    secret: Option<&SecretString>,
) -> Result<Option<Vec<u8>>, VaultError> {
    secret
        .map(|s| keyring.seal(s.expose_secret(), &context(id, column)))
        .transpose()
}

fn open(
    keyring: &Keyring,
    id: Uuid,
    column: &str,
    sealed: Option<Vec<u8>>,
) -> Result<Option<SecretString>, VaultError> {
    sealed
        .map(|blob| keyring.open(&blob, &context(id, column)))
        .transpose()
}

/// Reads a connection from a row selected with [`COLUMNS`] starting at `offset`.
pub fn from_row(row: &Row, offset: usize, keyring: &Keyring) -> Result<Connection, StoreError> {
    let id: Uuid = row.try_get(offset)?;
    let provider: String = row.try_get(offset + 2)?;
    let status: String = row.try_get(offset + 10)?;
    Ok(Connection {
        id,
        user_id: row.try_get(offset + 1)?,
        provider: provider.parse().map_err(StoreError::Invalid)?,
        base_url: row.try_get(offset + 3)?,
        settings: row.try_get(offset + 4)?,
        access_token: open(keyring, id, "access_token", row.try_get(offset + 5)?)?,
        refresh_token: open(keyring, id, "refresh_token", row.try_get(offset + 6)?)?,
        token_url: row.try_get(offset + 7)?,
        client_id: row.try_get(offset + 8)?,
        client_secret: open(keyring, id, "client_secret", row.try_get(offset + 9)?)?,
        status: ConnectionStatus::parse(&status),
        status_reason: row.try_get(offset + 11)?,
    })
}

fn check(new: &NewConnection) -> Result<(), StoreError> {
    if new.user_id.trim().is_empty() {
        return Err(StoreError::Invalid("user must not be empty".into()));
    }
    let url = reqwest::Url::parse(&new.base_url)
        .map_err(|e| StoreError::Invalid(format!("base URL {:?}: {e}", new.base_url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(StoreError::Invalid("base URL must be http or https".into()));
    }
    if let Some(token_url) = &new.token_url {
        reqwest::Url::parse(token_url)
            .map_err(|e| StoreError::Invalid(format!("token URL {token_url:?}: {e}")))?;
    }
    if new.refresh_token.is_some() != new.token_url.is_some() {
        return Err(StoreError::Invalid(
            "a refresh token and a token URL go together".into(),
        ));
    }
    if !new.settings.is_object() {
        return Err(StoreError::Invalid("settings must be a JSON object".into()));
    }
    Ok(())
}

pub async fn create(
    pool: &Pool,
    keyring: &Keyring,
    new: &NewConnection,
) -> Result<Uuid, StoreError> {
    check(new)?;
    let id = Uuid::now_v7();
    let client = pool.get().await?;
    insert(&client, keyring, id, new).await?;
    Ok(id)
}

async fn insert(
    client: &impl GenericClient,
    keyring: &Keyring,
    id: Uuid,
    new: &NewConnection,
) -> Result<(), StoreError> {
    client
        .execute(
            "insert into connections (id, user_id, provider, base_url, settings, access_token, \
             refresh_token, token_url, client_id, client_secret) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &id,
                &new.user_id,
                &new.provider.as_str(),
                &new.base_url,
                &new.settings,
                &seal(keyring, id, "access_token", new.access_token.as_ref())?,
                &seal(keyring, id, "refresh_token", new.refresh_token.as_ref())?,
                &new.token_url,
                &new.client_id,
                &seal(keyring, id, "client_secret", new.client_secret.as_ref())?,
            ],
        )
        .await?;
    Ok(())
}

/// Replaces a connection's URL and credentials (the user reconnected the account) and
/// makes it active again.
pub async fn replace(
    pool: &Pool,
    keyring: &Keyring,
    id: Uuid,
    new: &NewConnection,
) -> Result<(), StoreError> {
    check(new)?;
    let client = pool.get().await?;
    update(&client, keyring, id, new).await
}

async fn update(
    client: &impl GenericClient,
    keyring: &Keyring,
    id: Uuid,
    new: &NewConnection,
) -> Result<(), StoreError> {
    let updated = client
        .execute(
            "update connections set base_url = $3, settings = $4, access_token = $5, \
             refresh_token = $6, token_url = $7, client_id = $8, client_secret = $9, \
             status = 'active', status_reason = null, updated_at = now() \
             where id = $1 and user_id = $2 and provider = $10",
            &[
                &id,
                &new.user_id,
                &new.base_url,
                &new.settings,
                &seal(keyring, id, "access_token", new.access_token.as_ref())?,
                &seal(keyring, id, "refresh_token", new.refresh_token.as_ref())?,
                &new.token_url,
                &new.client_id,
                &seal(keyring, id, "client_secret", new.client_secret.as_ref())?,
                &new.provider.as_str(),
            ],
        )
        .await?;
    if updated == 0 {
        return Err(StoreError::NotFound(format!(
            "no {} connection {id} for user {}",
            new.provider, new.user_id
        )));
    }
    Ok(())
}

/// Changes to a stored connection: what is `None` stays as it is. New credentials (an
/// access or refresh token) make a connection that needs re-authorisation active again.
#[derive(Debug, Clone, Default)]
pub struct ConnectionPatch {
    pub base_url: Option<String>,
    pub api_version: Option<String>,
    pub access_token: Option<SecretString>,
    pub refresh_token: Option<SecretString>,
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
}

impl ConnectionPatch {
    pub fn is_empty(&self) -> bool {
        self.base_url.is_none()
            && self.api_version.is_none()
            && self.access_token.is_none()
            && self.refresh_token.is_none()
            && self.token_url.is_none()
            && self.client_id.is_none()
            && self.client_secret.is_none()
    }

    fn renews_credentials(&self) -> bool {
        self.access_token.is_some() || self.refresh_token.is_some()
    }

    /// The connection with these changes applied.
    fn apply(self, current: Connection) -> NewConnection {
        let mut settings = current.settings;
        if let (Some(version), Some(map)) = (self.api_version, settings.as_object_mut()) {
            map.insert("api_version".into(), Value::String(version));
        }
        NewConnection {
            user_id: current.user_id,
            provider: current.provider,
            base_url: self.base_url.unwrap_or(current.base_url),
            settings,
            access_token: self.access_token.or(current.access_token),
            refresh_token: self.refresh_token.or(current.refresh_token),
            token_url: self.token_url.or(current.token_url),
            client_id: self.client_id.or(current.client_id),
            client_secret: self.client_secret.or(current.client_secret),
        }
    }
}

/// Applies `patch` to a connection: the fields given change, the others (a stored access
/// token above all) stay. One writer at a time (the row is locked while it is read).
pub async fn patch(
    pool: &Pool,
    keyring: &Keyring,
    id: Uuid,
    patch: ConnectionPatch,
) -> Result<(), StoreError> {
    if patch.is_empty() {
        return Err(StoreError::Invalid(
            "nothing to update: give --base-url, --access-token, --refresh-token with \
             --token-url, --client-id, --client-secret, --api-version and/or --rate-limit"
                .into(),
        ));
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!("select {COLUMNS} from connections c where c.id = $1 for update"),
            &[&id],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no connection {id}")))?;
    let current = from_row(&row, 0, keyring)?;
    let (status, reason) = (current.status, current.status_reason.clone());
    let renews = patch.renews_credentials();
    let new = patch.apply(current);
    check(&new)?;
    update(&tx, keyring, id, &new).await?;
    if !renews && status != ConnectionStatus::Active {
        // Only new credentials cure a refused refresh token.
        tx.execute(
            "update connections set status = $2, status_reason = $3 where id = $1",
            &[&id, &status.as_str(), &reason],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Whether [`connect_account`] made a connection or gave one new credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Created,
    /// In place: the same id, so the subscriptions bound to it stay.
    Replaced,
}

/// Stores an account the user connected (through the portal): the user's connection of that
/// provider ([`user_connection`]) gets the new credentials in place and becomes active, or
/// a new one is made. One user and provider at a time (a transaction-scoped advisory lock),
/// so two callbacks racing leave one connection.
pub async fn connect_account(
    pool: &Pool,
    keyring: &Keyring,
    new: &NewConnection,
) -> Result<(Uuid, Stored), StoreError> {
    check(new)?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "select pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("connect/{}/{}", new.provider, new.user_id)],
    )
    .await?;
    let existing = tx
        .query_opt(
            &format!("{NEWEST} limit 1"),
            &[&new.user_id, &new.provider.as_str()],
        )
        .await?;
    let stored = match existing {
        Some(row) => {
            let id: Uuid = row.try_get(0)?;
            update(&tx, keyring, id, new).await?;
            (id, Stored::Replaced)
        }
        None => {
            let id = Uuid::now_v7();
            insert(&tx, keyring, id, new).await?;
            (id, Stored::Created)
        }
    };
    tx.commit().await?;
    Ok(stored)
}

/// A user's connections of one provider, newest first.
const NEWEST: &str = "select id from connections where user_id = $1 and provider = $2 \
     order by created_at desc, id desc";

/// The connection the portal shows and manages for a user and provider: the newest, when
/// the management API made several.
pub async fn user_connection(
    pool: &Pool,
    user: &str,
    provider: Provider,
) -> Result<Option<ConnectionSummary>, StoreError> {
    let client = pool.get().await?;
    let newest = client
        .query_opt(&format!("{NEWEST} limit 1"), &[&user, &provider.as_str()])
        .await?;
    let Some(row) = newest else {
        return Ok(None);
    };
    let id: Uuid = row.try_get(0)?;
    let listed = list(pool, Some(user)).await?;
    Ok(listed.into_iter().find(|c| c.id == id))
}

pub async fn get(pool: &Pool, keyring: &Keyring, id: Uuid) -> Result<Connection, StoreError> {
    let (connection, _) = get_versioned(pool, keyring, id).await?;
    Ok(connection)
}

/// A connection as stored now, and its access token as sealed: the version a
/// compare-and-swap ([`store_refreshed`], [`mark_needs_reauth`]) compares against.
pub async fn get_versioned(
    pool: &Pool,
    keyring: &Keyring,
    id: Uuid,
) -> Result<(Connection, TokenVersion), StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("select {COLUMNS} from connections c where c.id = $1"),
            &[&id],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no connection {id}")))?;
    // The sealed access token, as stored (column 5 of COLUMNS).
    let version = TokenVersion(row.try_get(5)?);
    Ok((from_row(&row, 0, keyring)?, version))
}

/// A connection's access token as sealed when read. Sealing draws a fresh nonce, so any
/// write of the token (a refresh, new credentials, a key rotation) changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenVersion(Option<Vec<u8>>);

/// Stores refreshed tokens unless the access token changed since `version` was read, and
/// makes the connection active: a refresh that succeeded proves the credentials good, even
/// if a concurrent refresh (refused as the provider rotated the refresh token) marked it.
/// Returns whether they were stored.
pub async fn store_refreshed(
    pool: &Pool,
    keyring: &Keyring,
    id: Uuid,
    version: &TokenVersion,
    access_token: &SecretString,
    refresh_token: Option<&SecretString>,
) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let updated = client
        .execute(
            "update connections set access_token = $3, refresh_token = $4, status = 'active', \
             status_reason = null, token_refreshed_at = now(), updated_at = now() \
             where id = $1 and access_token is not distinct from $2",
            &[
                &id,
                &version.0,
                &seal(keyring, id, "access_token", Some(access_token))?,
                &seal(keyring, id, "refresh_token", refresh_token)?,
            ],
        )
        .await?;
    Ok(updated == 1)
}

/// Marks the connection as needing re-authorisation unless its access token changed since
/// `version` was read (then someone refreshed or reconnected it meanwhile). Returns whether
/// it was marked.
pub async fn mark_needs_reauth(
    pool: &Pool,
    id: Uuid,
    version: &TokenVersion,
    reason: &str,
) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let updated = client
        .execute(
            "update connections set status = 'needs_reauth', status_reason = $3, \
             updated_at = now() where id = $1 and access_token is not distinct from $2",
            &[&id, &version.0, &reason],
        )
        .await?;
    Ok(updated == 1)
}

pub async fn list(pool: &Pool, user: Option<&str>) -> Result<Vec<ConnectionSummary>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "select c.id, c.user_id, c.provider, c.base_url, c.settings, \
             c.access_token is not null, c.refresh_token is not null, c.token_url, c.client_id, \
             c.status, c.status_reason, c.token_refreshed_at, c.created_at, \
             c.rate_limit_calls, c.rate_limit_interval_ms, b.learned_calls, \
             b.learned_interval_ms, b.remaining, b.api_used, b.api_max, b.observed_at \
             from connections c left join rate_budgets b on b.connection_id = c.id \
             where ($1::text is null or c.user_id = $1) order by c.created_at",
            &[&user],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let provider: String = row.try_get(2)?;
            let status: String = row.try_get(9)?;
            Ok(ConnectionSummary {
                id: row.try_get(0)?,
                user_id: row.try_get(1)?,
                provider: provider.parse().map_err(StoreError::Invalid)?,
                base_url: row.try_get(3)?,
                settings: row.try_get(4)?,
                has_access_token: row.try_get(5)?,
                has_refresh_token: row.try_get(6)?,
                token_url: row.try_get(7)?,
                client_id: row.try_get(8)?,
                status: ConnectionStatus::parse(&status),
                status_reason: row.try_get(10)?,
                token_refreshed_at: row.try_get(11)?,
                created_at: row.try_get(12)?,
                rate_limit: RateLimit::from_columns(row.try_get(13)?, row.try_get(14)?)
                    .map(|l| l.to_string()),
                learned_rate_limit: RateLimit::from_columns(row.try_get(15)?, row.try_get(16)?)
                    .map(|l| l.to_string()),
                rate_limit_remaining: row.try_get(17)?,
                api_usage: match (
                    row.try_get::<_, Option<i64>>(18)?,
                    row.try_get::<_, Option<i64>>(19)?,
                ) {
                    (Some(used), Some(max)) => Some(format!("{used}/{max}")),
                    _ => None,
                },
                limits_observed_at: row.try_get(20)?,
            })
        })
        .collect()
}

/// Sets a connection's own rate limit (`None`: back to its provider's default). With
/// `user`, only that user's connection.
pub async fn set_rate_limit(
    pool: &Pool,
    id: Uuid,
    user: Option<&str>,
    limit: Option<RateLimit>,
) -> Result<(), StoreError> {
    let client = pool.get().await?;
    let calls = limit.map(|l| i32::try_from(l.calls).unwrap_or(i32::MAX));
    let interval = limit.map(|l| l.interval_ms());
    let updated = client
        .execute(
            "update connections set rate_limit_calls = $3, rate_limit_interval_ms = $4, \
             updated_at = now() where id = $1 and ($2::text is null or user_id = $2)",
            &[&id, &user, &calls, &interval],
        )
        .await?;
    if updated == 0 {
        return Err(StoreError::NotFound(format!("no connection {id}")));
    }
    Ok(())
}

/// Deletes a connection; its subscriptions go with it. With `user`, only that user's.
pub async fn delete(pool: &Pool, id: Uuid, user: Option<&str>) -> Result<(), StoreError> {
    let client = pool.get().await?;
    let deleted = client
        .execute(
            "delete from connections where id = $1 and ($2::text is null or user_id = $2)",
            &[&id, &user],
        )
        .await?;
    if deleted == 0 {
        return Err(StoreError::NotFound(format!("no connection {id}")));
    }
    Ok(())
}

/// Re-encrypts every secret under the active key. Returns how many connections changed.
pub async fn rotate_key(pool: &Pool, keyring: &Keyring) -> Result<u64, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "select id, access_token, refresh_token, client_secret from connections for update",
            &[],
        )
        .await?;
    let mut changed = 0;
    for row in rows {
        let id: Uuid = row.try_get(0)?;
        let mut resealed: Vec<Option<Vec<u8>>> = Vec::with_capacity(3);
        let mut stale = false;
        for (index, column) in [
            (1, "access_token"),
            (2, "refresh_token"),
            (3, "client_secret"),
        ] {
            let sealed: Option<Vec<u8>> = row.try_get(index)?;
            if let Some(blob) = &sealed {
                stale |= Keyring::key_id_of(blob)? != keyring.active_key_id();
            }
            let secret = open(keyring, id, column, sealed)?;
            resealed.push(seal(keyring, id, column, secret.as_ref())?);
        }
        if !stale {
            continue;
        }
        tx.execute(
            "update connections set access_token = $2, refresh_token = $3, client_secret = $4, \
             updated_at = now() where id = $1",
            &[&id, &resealed[0], &resealed[1], &resealed[2]],
        )
        .await?;
        changed += 1;
    }
    tx.commit().await?;
    Ok(changed)
}
