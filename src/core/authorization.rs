//! An OAuth authorization in flight (authorization code with PKCE): the `state` sent to the
//! provider and checked on the way back, and the PKCE pair (RFC 7636, S256).
//!
//! The state is `provider.nonce.expiry.user.mac`: bound to the user and the provider, it
//! expires, and its HMAC-SHA256 makes it unforgeable. Single use comes from the nonce, which
//! is also stored server-side with the verifier and consumed once (`catalog::authorizations`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};

use crate::core::provider::Provider;

/// A state's parts once its signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub provider: Provider,
    pub nonce: String,
    pub user: String,
    /// Seconds since the epoch.
    pub expires_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the state is not one this server issued")]
    Malformed,
    #[error("the state's signature does not match: it was altered or forged")]
    Forged,
    #[error("the state has expired: the authorization took too long")]
    Expired,
    #[error("the state was issued for another provider")]
    WrongProvider,
}

#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// `n` random bytes from the operating system, base64url: nonces, verifiers, session ids.
pub fn random_token(n: usize) -> Result<String, RandomError> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|_| RandomError)?;
    Ok(B64.encode(bytes))
}

/// A PKCE verifier (43 characters: 32 random bytes) and its S256 challenge.
pub struct Pkce {
    pub verifier: SecretString,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Result<Pkce, RandomError> {
        let verifier = random_token(32)?;
        let challenge = challenge(&verifier);
        Ok(Pkce {
            verifier: SecretString::from(verifier),
            challenge,
        })
    }
}

/// BASE64URL(SHA256(verifier)), RFC 7636 §4.2.
pub fn challenge(verifier: &str) -> String {
    B64.encode(Sha256::digest(verifier.as_bytes()))
}

impl State {
    /// The state's text, signed with `key`.
    pub fn sign(&self, key: &SecretBox<[u8; 32]>) -> String {
        let unsigned = format!(
            "{}.{}.{}.{}",
            self.provider,
            self.nonce,
            self.expires_at,
            B64.encode(self.user.as_bytes())
        );
        let tag = B64.encode(mac(key, &unsigned));
        format!("{unsigned}.{tag}")
    }

    /// The state `text` says, if `key` signed it, it has not expired at `now` (seconds since
    /// the epoch) and it was issued for `provider`.
    pub fn verify(
        text: &str,
        provider: Provider,
        key: &SecretBox<[u8; 32]>,
        now: u64,
    ) -> Result<State, StateError> {
        let (unsigned, tag) = text.rsplit_once('.').ok_or(StateError::Malformed)?;
        let tag = B64.decode(tag).map_err(|_| StateError::Malformed)?;
        let mut check = hmac(key);
        check.update(unsigned.as_bytes());
        // Constant time: the comparison reveals nothing about the right tag.
        check.verify_slice(&tag).map_err(|_| StateError::Forged)?;
        let parts: Vec<&str> = unsigned.split('.').collect();
        let [issued_for, nonce, expires_at, user] = parts[..] else {
            return Err(StateError::Malformed);
        };
        let issued_for: Provider = issued_for.parse().map_err(|_| StateError::Malformed)?;
        let expires_at: u64 = expires_at.parse().map_err(|_| StateError::Malformed)?;
        let user = B64
            .decode(user)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or(StateError::Malformed)?;
        if issued_for != provider {
            return Err(StateError::WrongProvider);
        }
        if now > expires_at {
            return Err(StateError::Expired);
        }
        Ok(State {
            provider: issued_for,
            nonce: nonce.to_owned(),
            user,
            expires_at,
        })
    }
}

fn hmac(key: &SecretBox<[u8; 32]>) -> Hmac<Sha256> {
    // HMAC takes a key of any length: a 32-byte key is always accepted, and the fallback
    // (an empty MAC state under a zero key) is never reached.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose_secret())
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()))
}

fn mac(key: &SecretBox<[u8; 32]>, text: &str) -> Vec<u8> {
    let mut mac = hmac(key);
    mac.update(text.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretBox<[u8; 32]> {
        SecretBox::new(Box::new([byte; 32]))
    }

    fn state() -> State {
        State {
            provider: Provider::Hubspot,
            nonce: random_token(32).expect("random"),
            user: "user.with.dots@example.com".into(),
            expires_at: 1_000,
        }
    }

    #[test]
    fn the_challenge_is_rfc_7636s_example() {
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let pkce = Pkce::new().expect("random");
        assert_eq!(pkce.verifier.expose_secret().len(), 43);
        assert_eq!(pkce.challenge, challenge(pkce.verifier.expose_secret()));
    }

    #[test]
    fn a_signed_state_verifies_until_it_expires() {
        let state = state();
        let text = state.sign(&key(1));

        assert_eq!(
            State::verify(&text, Provider::Hubspot, &key(1), 1_000),
            Ok(state)
        );
        assert_eq!(
            State::verify(&text, Provider::Hubspot, &key(1), 1_001),
            Err(StateError::Expired)
        );
        assert_eq!(
            State::verify(&text, Provider::Salesforce, &key(1), 10),
            Err(StateError::WrongProvider)
        );
    }

    #[test]
    fn an_altered_or_foreign_state_is_forged() {
        let text = state().sign(&key(1));
        let later = text.replacen(".1000.", ".9999.", 1);

        assert_eq!(
            State::verify(&text, Provider::Hubspot, &key(2), 10),
            Err(StateError::Forged)
        );
        assert_eq!(
            State::verify(&later, Provider::Hubspot, &key(1), 10),
            Err(StateError::Forged)
        );
        for junk in ["", "abc", "a.b", "hubspot.n.1.dQ.!!!"] {
            assert!(
                State::verify(junk, Provider::Hubspot, &key(1), 10).is_err(),
                "{junk}"
            );
        }
    }
}
