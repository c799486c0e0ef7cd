//! Browser sessions of the pages, one kind each (`portal`, `console`). A session is a random cookie value whose SHA-256 is stored with who it belongs to,
//! the CSRF token of its forms and when it expires.

use std::time::Duration;

use deadpool_postgres::Pool;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;

use crate::core::authorization::random_token;
use crate::store::db::StoreError;

/// A live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Who the session belongs to (the portal: the user id).
    pub subject: String,
    /// Goes into every form of the session's pages and must come back with each post.
    pub csrf_token: String,
    /// The stored digest of the cookie: what ties an OAuth authorization to this browser.
    pub digest: Vec<u8>,
}

/// A session just opened: the cookie value to set, and the session.
pub struct Opened {
    pub cookie: SecretString,
    pub session: Session,
}

/// SHA-256 of a secret, as stored in place of it.
pub fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Opens a session of `kind` for `subject` lasting `ttl`. `opened_by`, the credential that
/// opened it, opens one session only: a second use is a conflict. Expired sessions are
/// removed on the way.
pub async fn open(
    pool: &Pool,
    kind: &str,
    subject: &str,
    opened_by: Option<&SecretString>,
    ttl: Duration,
) -> Result<Opened, StoreError> {
    let random = |_| StoreError::Invalid("the system random number generator failed".into());
    let cookie = random_token(32).map_err(random)?;
    let csrf_token = random_token(32).map_err(random)?;
    let session_digest = digest(&cookie);
    let opened_by = opened_by.map(|credential| digest(credential.expose_secret()));
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let client = pool.get().await?;
    client
        .execute("delete from web_sessions where expires_at < now()", &[])
        .await?;
    let inserted = client
        .execute(
            "insert into web_sessions (digest, kind, subject, csrf_token, opened_by, expires_at) \
             values ($1, $2, $3, $4, $5, now() + $6 * interval '1 millisecond')",
            &[
                &session_digest,
                &kind,
                &subject,
                &csrf_token,
                &opened_by,
                &(ttl_ms as f64),
            ],
        )
        .await;
    match inserted {
        Ok(_) => Ok(Opened {
            cookie: SecretString::from(cookie),
            session: Session {
                subject: subject.to_owned(),
                csrf_token,
                digest: session_digest,
            },
        }),
        Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(StoreError::Conflict(
            "this link was used already: open the page again from the app".into(),
        )),
        Err(err) => Err(err.into()),
    }
}

/// The live session of `kind` the cookie value belongs to, if any.
pub async fn find(pool: &Pool, kind: &str, cookie: &str) -> Result<Option<Session>, StoreError> {
    let session_digest = digest(cookie);
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "select subject, csrf_token from web_sessions \
             where digest = $1 and kind = $2 and expires_at > now()",
            &[&session_digest, &kind],
        )
        .await?;
    row.map(|row| {
        Ok(Session {
            subject: row.try_get(0)?,
            csrf_token: row.try_get(1)?,
            digest: session_digest.clone(),
        })
    })
    .transpose()
}

/// Ends the session of `kind` the cookie value belongs to (logging out).
pub async fn close(pool: &Pool, kind: &str, cookie: &str) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client
        .execute(
            "delete from web_sessions where digest = $1 and kind = $2",
            &[&digest(cookie), &kind],
        )
        .await?;
    Ok(())
}
