//! Encryption of connection secrets at rest.
//!
//! Each secret is sealed with XChaCha20-Poly1305 under the active key, with a random 192-bit
//! nonce, and bound (as associated data) to the row and column it belongs to, so a ciphertext
//! copied into another connection does not decrypt. Stored layout:
//! `[1][key id length][key id][24-byte nonce][ciphertext and tag]`. The key id lets old keys
//! keep decrypting while `connection rotate-key` re-encrypts under the new one.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

use crate::config::SecretSettings;

const FORMAT_VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(
        "no encryption key configured: set secrets.active_key and secrets.keys \
         (APPEVENTS__SECRETS__ACTIVE_KEY, APPEVENTS__SECRETS__KEYS__<ID>); \
         `appevents secrets generate-key` prints a new key"
    )]
    NoKey,
    #[error("secrets.active_key {0:?} is not among secrets.keys")]
    UnknownActiveKey(String),
    #[error("encryption key {0:?} is not base64 of 32 bytes")]
    BadKey(String),
    #[error("secret was encrypted with key {0:?}, which is not configured")]
    MissingKey(String),
    #[error("secret is not in a format this version reads")]
    Malformed,
    #[error("secret does not decrypt: wrong key, or the value was tampered with or moved")]
    Decrypt,
    #[error("the system random number generator failed")]
    Random,
}

/// The configured keys; cheap to clone behind an `Arc`.
pub struct Keyring {
    active_id: String,
    ciphers: HashMap<String, XChaCha20Poly1305>,
    /// The active key's bytes, from which [`Keyring::derive`] makes keys for other purposes.
    active_bytes: SecretBox<[u8; 32]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.ciphers.keys().collect();
        ids.sort();
        f.debug_struct("Keyring")
            .field("active_id", &self.active_id)
            .field("key_ids", &ids)
            .finish()
    }
}

impl Keyring {
    pub fn from_settings(settings: &SecretSettings) -> Result<Keyring, VaultError> {
        if settings.active_key.is_empty() {
            return Err(VaultError::NoKey);
        }
        let mut ciphers = HashMap::new();
        for (id, key) in &settings.keys {
            ciphers.insert(id.clone(), cipher(id, key)?);
        }
        let active = settings
            .keys
            .get(&settings.active_key)
            .ok_or_else(|| VaultError::UnknownActiveKey(settings.active_key.clone()))?;
        let active_bytes = key_bytes(&settings.active_key, active)?;
        Ok(Keyring {
            active_id: settings.active_key.clone(),
            ciphers,
            active_bytes: SecretBox::new(Box::new(active_bytes)),
        })
    }

    /// A key for another purpose (signing the OAuth state, say), derived from the active key
    /// with HMAC-SHA256 over `purpose`, so no purpose's key reveals the vault's or another's.
    pub fn derive(&self, purpose: &str) -> SecretBox<[u8; 32]> {
        let derived = Hmac::<Sha256>::new_from_slice(self.active_bytes.expose_secret())
            .map(|mac| mac.chain_update(purpose.as_bytes()).finalize().into_bytes());
        let mut key = [0u8; 32];
        // HMAC takes a key of any length: the error branch cannot be reached.
        if let Ok(derived) = derived {
            key.copy_from_slice(&derived);
        }
        SecretBox::new(Box::new(key))
    }

    pub fn active_key_id(&self) -> &str {
        &self.active_id
    }

    /// Seals `plaintext` under the active key, bound to `context` (e.g. `connection/<id>/access_token`).
    pub fn seal(&self, plaintext: &str, context: &str) -> Result<Vec<u8>, VaultError> {
        let cipher = self
            .ciphers
            .get(&self.active_id)
            .ok_or_else(|| VaultError::MissingKey(self.active_id.clone()))?;
        let nonce = XNonce::try_generate().map_err(|_| VaultError::Random)?;
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| VaultError::Decrypt)?;
        let id = self.active_id.as_bytes();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + sealed.len());
        out.push(FORMAT_VERSION);
        out.push(u8::try_from(id.len()).map_err(|_| VaultError::Malformed)?);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, blob: &[u8], context: &str) -> Result<SecretString, VaultError> {
        let (id, nonce, sealed) = split(blob)?;
        let cipher = self
            .ciphers
            .get(id)
            .ok_or_else(|| VaultError::MissingKey(id.to_owned()))?;
        let nonce = XNonce::try_from(nonce).map_err(|_| VaultError::Malformed)?;
        let plain = cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: sealed,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| VaultError::Decrypt)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| VaultError::Malformed)
    }

    /// Id of the key a stored secret was sealed with.
    pub fn key_id_of(blob: &[u8]) -> Result<&str, VaultError> {
        split(blob).map(|(id, _, _)| id)
    }
}

/// A fresh random key, base64, for `secrets.keys`.
pub fn generate_key() -> Result<String, VaultError> {
    let key = Key::try_generate().map_err(|_| VaultError::Random)?;
    Ok(STANDARD.encode(key))
}

fn cipher(id: &str, key: &SecretString) -> Result<XChaCha20Poly1305, VaultError> {
    let bytes = key_bytes(id, key)?;
    XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| VaultError::BadKey(id.to_owned()))
}

fn key_bytes(id: &str, key: &SecretString) -> Result<[u8; 32], VaultError> {
    let bytes = STANDARD
        .decode(key.expose_secret().trim())
        .map_err(|_| VaultError::BadKey(id.to_owned()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| VaultError::BadKey(id.to_owned()))
}

fn split(blob: &[u8]) -> Result<(&str, &[u8], &[u8]), VaultError> {
    let [version, id_len, rest @ ..] = blob else {
        return Err(VaultError::Malformed);
    };
    if *version != FORMAT_VERSION {
        return Err(VaultError::Malformed);
    }
    let id_len = usize::from(*id_len);
    if rest.len() < id_len + NONCE_LEN {
        return Err(VaultError::Malformed);
    }
    let (id, rest) = rest.split_at(id_len);
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let id = std::str::from_utf8(id).map_err(|_| VaultError::Malformed)?;
    Ok((id, nonce, sealed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn keyring(active: &str, ids: &[&str]) -> Keyring {
        let keys: BTreeMap<String, SecretString> = ids
            .iter()
            .map(|id| {
                let key = STANDARD.encode([id.as_bytes()[0]; 32]);
                (id.to_string(), SecretString::from(key))
            })
            .collect();
        Keyring::from_settings(&SecretSettings {
            keys,
            active_key: active.to_owned(),
        })
        .expect("valid keyring")
    }

    #[test]
    fn a_sealed_secret_opens_only_in_its_own_context() {
        let ring = keyring("a", &["a"]);
        let blob = ring
            .seal("tok-123", "connection/1/access_token")
            .expect("seal");
        assert!(
            !blob.windows(7).any(|w| w == b"tok-123"),
            "plaintext leaked"
        );
        let opened = ring.open(&blob, "connection/1/access_token").expect("open");
        assert_eq!(opened.expose_secret(), "tok-123");
        assert!(matches!(
            ring.open(&blob, "connection/2/access_token"),
            Err(VaultError::Decrypt)
        ));
    }

    #[test]
    fn old_keys_keep_opening_after_rotation() {
        let old = keyring("a", &["a"]);
        let blob = old.seal("s", "c").expect("seal");
        let rotated = keyring("b", &["a", "b"]);
        assert_eq!(Keyring::key_id_of(&blob).expect("id"), "a");
        assert_eq!(rotated.open(&blob, "c").expect("open").expose_secret(), "s");
        let resealed = rotated.seal("s", "c").expect("seal");
        assert_eq!(Keyring::key_id_of(&resealed).expect("id"), "b");
        let only_new = keyring("b", &["b"]);
        assert!(matches!(only_new.open(&blob, "c"), Err(VaultError::MissingKey(id)) if id == "a"));
    }

    #[test]
    fn tampering_and_garbage_are_refused() {
        let ring = keyring("a", &["a"]);
        let mut blob = ring.seal("s", "c").expect("seal");
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert!(matches!(ring.open(&blob, "c"), Err(VaultError::Decrypt)));
        assert!(matches!(
            ring.open(&[1, 200], "c"),
            Err(VaultError::Malformed)
        ));
        assert!(matches!(ring.open(&[], "c"), Err(VaultError::Malformed)));
    }

    #[test]
    fn missing_or_bad_keys_are_clear_errors() {
        let none = SecretSettings {
            keys: BTreeMap::new(),
            active_key: String::new(),
        };
        assert!(matches!(
            Keyring::from_settings(&none),
            Err(VaultError::NoKey)
        ));
        let bad = SecretSettings {
            keys: BTreeMap::from([("k".to_owned(), SecretString::from("short"))]),
            active_key: "k".into(),
        };
        assert!(matches!(
            Keyring::from_settings(&bad),
            Err(VaultError::BadKey(_))
        ));
        assert!(generate_key().is_ok());
    }
}
