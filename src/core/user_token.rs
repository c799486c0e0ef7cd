//! User tokens: the product's backend vouches for one of its end users with a short-lived
//! JWT (HS256) signed with a key both sides hold, named by the token's `kid`. `sub` is the
//! user id, `aud` the configured audience, `exp` no further ahead than the configured
//! maximum. Several keys verify at once, so a key can be rotated without a gap.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::config::UserTokenSettings;

/// What a user token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub aud: Audience,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// A unique id: two tokens minted for one user in the same second still differ, and
    /// each opens its own portal session (a token opens one only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// `aud`: one audience, or several (RFC 7519 §4.1.3 allows both; golang-jwt sends a list).
/// The signature check has already required ours among them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Why a token was refused. The page says only "invalid or expired"; the log says which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no user token keys are configured (user_tokens.keys)")]
    NoKeys,
    #[error("the token names no key (no kid in its header)")]
    MissingKid,
    #[error("the token names key {0:?}, which is not configured")]
    UnknownKid(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token lives longer than user_tokens.max_lifetime allows")]
    TooLong,
    #[error("the token's subject (the user id) is empty")]
    NoSubject,
    #[error("the token is invalid: {0}")]
    Invalid(String),
    #[error("no signing key: set user_tokens.signing_key to one of user_tokens.keys")]
    NoSigningKey,
}

/// The configured keys, ready to sign and verify.
pub struct KeyRing {
    keys: BTreeMap<String, (EncodingKey, DecodingKey)>,
    signing_kid: Option<String>,
    audience: String,
    max_lifetime: Duration,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("signing_kid", &self.signing_kid)
            .field("audience", &self.audience)
            .finish()
    }
}

impl KeyRing {
    pub fn from_settings(settings: &UserTokenSettings) -> Result<KeyRing, TokenError> {
        let mut keys = BTreeMap::new();
        for (kid, secret) in &settings.keys {
            let bytes = secret.expose_secret().as_bytes();
            let invalid = |e: jsonwebtoken::errors::Error| {
                TokenError::Invalid(format!("user_tokens.keys.{kid}: {e}"))
            };
            let pair = (
                EncodingKey::from_secret(bytes).map_err(invalid)?,
                DecodingKey::from_secret(bytes).map_err(invalid)?,
            );
            keys.insert(kid.clone(), pair);
        }
        let signing_kid = Some(settings.signing_key.clone()).filter(|kid| !kid.is_empty());
        Ok(KeyRing {
            keys,
            signing_kid,
            audience: settings.audience.clone(),
            max_lifetime: settings.max_lifetime,
        })
    }

    /// A token for `user`, valid for `lifetime`, signed with `user_tokens.signing_key`.
    pub fn sign(&self, user: &str, lifetime: Duration) -> Result<String, TokenError> {
        let kid = self.signing_kid.as_ref().ok_or(TokenError::NoSigningKey)?;
        let (encoding, _) = self.keys.get(kid).ok_or(TokenError::NoSigningKey)?;
        if user.trim().is_empty() {
            return Err(TokenError::NoSubject);
        }
        if lifetime > self.max_lifetime {
            return Err(TokenError::TooLong);
        }
        let now = now();
        let jti = crate::core::authorization::random_token(16)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let claims = Claims {
            sub: user.to_owned(),
            aud: Audience::One(self.audience.clone()),
            exp: now + lifetime.as_secs(),
            iat: Some(now),
            jti: Some(jti),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        jsonwebtoken::encode(&header, &claims, encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// The claims of a valid token: a known `kid`, an HS256 signature by that key, our
    /// audience, not expired (no leeway), not longer-lived than allowed, a subject.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if self.keys.is_empty() {
            return Err(TokenError::NoKeys);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(kind(&e)))?;
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        let (_, key) = self
            .keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKid(kid.clone()))?;
        // Exactly HS256: a token declaring another algorithm is refused before its signature
        // is looked at.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(kind(&e)),
            })?
            .claims;
        if claims.exp > now() + self.max_lifetime.as_secs() {
            return Err(TokenError::TooLong);
        }
        if claims.sub.trim().is_empty() {
            return Err(TokenError::NoSubject);
        }
        Ok(claims)
    }
}

/// The error's kind, never the token.
fn kind(err: &jsonwebtoken::errors::Error) -> String {
    format!("{:?}", err.kind())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    const KEY_1: &str = "first-user-token-key-of-32-bytes!!";
    const KEY_2: &str = "second-user-token-key-of-32-bytes!";

    fn ring(signing: &str, keys: &[(&str, &str)]) -> KeyRing {
        KeyRing::from_settings(&UserTokenSettings {
            keys: keys
                .iter()
                .map(|(kid, key)| (kid.to_string(), SecretString::from(key.to_string())))
                .collect(),
            signing_key: signing.to_owned(),
            audience: "appevents".to_owned(),
            max_lifetime: Duration::from_secs(900),
        })
        .expect("key ring")
    }

    fn forge(kid: Option<&str>, key: &str, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_secret(key.as_bytes()).expect("key"),
        )
        .expect("encode")
    }

    #[test]
    fn a_signed_token_verifies_with_any_key_of_the_ring() {
        let old = ring("k1", &[("k1", KEY_1)]);
        let rotated = ring("k2", &[("k1", KEY_1), ("k2", KEY_2)]);

        let token = old.sign("user-1", Duration::from_secs(300)).expect("sign");
        let claims = rotated.verify(&token).expect("the old key still verifies");

        assert_eq!(claims.sub, "user-1");
        assert_eq!(claims.aud, Audience::One("appevents".into()));
        let new_token = rotated
            .sign("user-1", Duration::from_secs(60))
            .expect("sign");
        assert_eq!(
            old.verify(&new_token),
            Err(TokenError::UnknownKid("k2".into()))
        );
    }

    #[test]
    fn forged_expired_and_misaddressed_tokens_are_refused() {
        let ring = ring("k1", &[("k1", KEY_1)]);
        let later = now() + 120;
        let good = serde_json::json!({"sub": "u", "aud": "appevents", "exp": later});

        assert!(ring.verify(&forge(Some("k1"), KEY_1, &good)).is_ok());
        let listed = serde_json::json!({"sub": "u", "aud": ["other", "appevents"], "exp": later});
        assert!(ring.verify(&forge(Some("k1"), KEY_1, &listed)).is_ok());
        assert!(matches!(
            ring.verify(&forge(Some("k1"), KEY_2, &good)),
            Err(TokenError::Invalid(kind)) if kind == "InvalidSignature"
        ));
        assert_eq!(
            ring.verify(&forge(None, KEY_1, &good)),
            Err(TokenError::MissingKid)
        );
        let expired = serde_json::json!({"sub": "u", "aud": "appevents", "exp": now() - 1});
        assert_eq!(
            ring.verify(&forge(Some("k1"), KEY_1, &expired)),
            Err(TokenError::Expired)
        );
        let other_audience = serde_json::json!({"sub": "u", "aud": "another", "exp": later});
        assert!(matches!(
            ring.verify(&forge(Some("k1"), KEY_1, &other_audience)),
            Err(TokenError::Invalid(kind)) if kind == "InvalidAudience"
        ));
        let too_long = serde_json::json!({"sub": "u", "aud": "appevents", "exp": now() + 86_400});
        assert_eq!(
            ring.verify(&forge(Some("k1"), KEY_1, &too_long)),
            Err(TokenError::TooLong)
        );
        let no_subject = serde_json::json!({"sub": " ", "aud": "appevents", "exp": later});
        assert_eq!(
            ring.verify(&forge(Some("k1"), KEY_1, &no_subject)),
            Err(TokenError::NoSubject)
        );
        assert!(ring.verify("not.a.jwt").is_err());
        assert!(ring.verify("").is_err());
    }

    #[test]
    fn another_algorithm_is_refused_even_with_the_right_key() {
        let ring = ring("k1", &[("k1", KEY_1)]);
        let mut header = Header::new(Algorithm::HS512);
        header.kid = Some("k1".into());
        let claims = serde_json::json!({"sub": "u", "aud": "appevents", "exp": now() + 60});
        let token = jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(KEY_1.as_bytes()).expect("key"),
        )
        .expect("encode");

        assert!(matches!(ring.verify(&token), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn signing_needs_a_signing_key_and_a_short_lifetime() {
        let verify_only = ring("", &[("k1", KEY_1)]);
        assert_eq!(
            verify_only.sign("u", Duration::from_secs(60)),
            Err(TokenError::NoSigningKey)
        );
        let ring = ring("k1", &[("k1", KEY_1)]);
        assert_eq!(
            ring.sign("u", Duration::from_secs(3600)),
            Err(TokenError::TooLong)
        );
        assert_eq!(
            ring.sign("", Duration::from_secs(60)),
            Err(TokenError::NoSubject)
        );
    }
}
