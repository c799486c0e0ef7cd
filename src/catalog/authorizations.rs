//! OAuth authorizations in flight: Connect was pressed, the provider has not redirected back
//! yet. Each row holds the state's nonce, whose it is, the browser session that started it
//! and the PKCE verifier (sealed). The callback consumes the row in one statement, so a state
//! works once however many requests race with it.

use std::time::Duration;

use deadpool_postgres::Pool;
use secrecy::{ExposeSecret, SecretString};

use crate::core::provider::Provider;
use crate::store::db::StoreError;
use crate::store::vault::Keyring;

/// An authorization about to start.
pub struct NewAuthorization<'a> {
    pub nonce: &'a str,
    pub user: &'a str,
    pub provider: Provider,
    pub session_digest: &'a [u8],
    pub verifier: Option<&'a SecretString>,
    pub ttl: Duration,
}

/// What taking an authorization back found.
#[derive(Debug)]
pub enum Taken {
    /// It was there, for this browser: the verifier, if PKCE was used.
    Found { verifier: Option<SecretString> },
    /// It was there, but another browser session started it: it stays for that one.
    OtherSession,
    /// No such authorization: it was used already, or never issued here.
    Missing,
}

fn context(nonce: &str) -> String {
    format!("oauth_authorization/{nonce}/verifier")
}

/// Stores an authorization about to start; expired ones are removed on the way.
pub async fn store(
    pool: &Pool,
    keyring: &Keyring,
    new: &NewAuthorization<'_>,
) -> Result<(), StoreError> {
    let verifier = new
        .verifier
        .map(|v| keyring.seal(v.expose_secret(), &context(new.nonce)))
        .transpose()?;
    let ttl_ms = new.ttl.as_millis() as f64;
    let client = pool.get().await?;
    client
        .execute(
            "delete from oauth_authorizations where expires_at < now()",
            &[],
        )
        .await?;
    client
        .execute(
            "insert into oauth_authorizations \
             (nonce, user_id, provider, session_digest, verifier, expires_at) \
             values ($1, $2, $3, $4, $5, now() + $6 * interval '1 millisecond')",
            &[
                &new.nonce,
                &new.user,
                &new.provider.as_str(),
                &new.session_digest,
                &verifier,
                &ttl_ms,
            ],
        )
        .await?;
    Ok(())
}

/// Takes the authorization of `nonce` for `user` and `provider` back, if `session_digest`
/// started it: deleted in the same statement that reads it, so only one caller gets it.
pub async fn take(
    pool: &Pool,
    keyring: &Keyring,
    nonce: &str,
    user: &str,
    provider: Provider,
    session_digest: &[u8],
) -> Result<Taken, StoreError> {
    let client = pool.get().await?;
    let taken = client
        .query_opt(
            "delete from oauth_authorizations \
             where nonce = $1 and user_id = $2 and provider = $3 and session_digest = $4 \
             returning verifier",
            &[&nonce, &user, &provider.as_str(), &session_digest],
        )
        .await?;
    if let Some(row) = taken {
        let sealed: Option<Vec<u8>> = row.try_get(0)?;
        let verifier = sealed
            .map(|blob| keyring.open(&blob, &context(nonce)))
            .transpose()?;
        return Ok(Taken::Found { verifier });
    }
    let elsewhere = client
        .query_opt(
            "select 1 from oauth_authorizations where nonce = $1",
            &[&nonce],
        )
        .await?;
    Ok(match elsewhere {
        Some(_) => Taken::OtherSession,
        None => Taken::Missing,
    })
}
