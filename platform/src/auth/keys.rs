//! Signing keys: one PKCS#8 PEM file per key in the keys directory, named `<kid>.pem`. Key ids
//! sort by creation time; the newest signs, all verify. Development keys carry `-dev` in their
//! id and production refuses to start with one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use jsonwebtoken::{DecodingKey, EncodingKey};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// Why the key set could not be loaded or extended.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the directory failed.
    #[error("keys directory {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A file is not an Ed25519 PKCS#8 PEM key.
    #[error("{0} is not an Ed25519 PKCS#8 PEM private key")]
    BadKey(PathBuf),
    /// No key and not allowed to make one.
    #[error("no signing key in {0}: run `cairn admin rotate-key` to create one")]
    Missing(PathBuf),
    /// Production with a development key.
    #[error("refusing to start in production with development signing key '{0}': run `cairn admin rotate-key` and remove the -dev key")]
    DevelopmentKey(String),
    /// Key generation failed.
    #[error("key generation failed")]
    Generate,
}

struct Key {
    encoding: EncodingKey,
    decoding: DecodingKey,
    public: Vec<u8>,
}

/// Every key in the directory; the newest signs. A key stops verifying once it has been retired
/// (a newer key exists) for longer than an access token lives: its tokens stay valid until they
/// expire, and no longer.
pub struct KeySet {
    keys: BTreeMap<String, Key>,
    token_ttl: chrono::Duration,
}

/// When the key with this id was created, from the id's timestamp prefix.
fn created_at(kid: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let stamp = kid.split('-').next()?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.fZ").ok().map(|t| t.and_utc())
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("private", &"REDACTED")
            .finish()
    }
}

impl KeySet {
    /// Loads the keys in `dir`. With none there, development generates a `-dev` key and
    /// production fails; production also refuses any `-dev` key.
    ///
    /// # Errors
    /// See [`KeyError`].
    pub fn load(dir: &Path, production: bool) -> Result<Self, KeyError> {
        Self::load_with_ttl(dir, production, std::time::Duration::from_secs(900))
    }

    /// As [`Self::load`], with the access-token lifetime that bounds a retired key's use.
    ///
    /// # Errors
    /// See [`KeyError`].
    pub fn load_with_ttl(dir: &Path, production: bool, token_ttl: std::time::Duration) -> Result<Self, KeyError> {
        let mut set = Self::read_dir(dir)?;
        if set.keys.is_empty() {
            if production {
                return Err(KeyError::Missing(dir.to_owned()));
            }
            let kid = generate(dir, true)?;
            tracing::warn!(kid, dir = %dir.display(), "generated a DEVELOPMENT signing key; production refuses it");
            set = Self::read_dir(dir)?;
        }
        set.token_ttl = chrono::Duration::from_std(token_ttl).unwrap_or_else(|_| chrono::Duration::minutes(15));
        if production {
            if let Some(kid) = set.keys.keys().find(|k| k.ends_with("-dev")) {
                return Err(KeyError::DevelopmentKey(kid.clone()));
            }
        }
        Ok(set)
    }

    fn read_dir(dir: &Path) -> Result<Self, KeyError> {
        let mut keys = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self { keys, token_ttl: chrono::Duration::minutes(15) });
            }
            Err(e) => return Err(KeyError::Io(dir.to_owned(), e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| KeyError::Io(dir.to_owned(), e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pem") {
                continue;
            }
            let Some(kid) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|e| KeyError::Io(path.clone(), e))?;
            let der = pem::parse(&text).map_err(|_| KeyError::BadKey(path.clone()))?;
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.contents())
                .map_err(|_| KeyError::BadKey(path.clone()))?;
            let public = pair.public_key().as_ref().to_vec();
            keys.insert(
                kid,
                Key {
                    encoding: EncodingKey::from_ed_der(der.contents()),
                    decoding: DecodingKey::from_ed_der(&public),
                    public,
                },
            );
        }
        Ok(Self { keys, token_ttl: chrono::Duration::minutes(15) })
    }

    /// The key id that signs new tokens.
    #[must_use]
    pub fn signing_kid(&self) -> Option<&str> {
        self.keys.keys().next_back().map(String::as_str)
    }

    pub(crate) fn signing(&self) -> Option<(&str, &EncodingKey)> {
        self.keys.iter().next_back().map(|(kid, key)| (kid.as_str(), &key.encoding))
    }

    pub(crate) fn decoding(&self, kid: &str) -> Option<&DecodingKey> {
        let key = self.keys.get(kid)?;
        // Retired when the next newer key was created; verifies for one token lifetime after that.
        let successor = self.keys.range::<str, _>((std::ops::Bound::Excluded(kid), std::ops::Bound::Unbounded)).next();
        if let Some(retired_at) = successor.and_then(|(next, _)| created_at(next)) {
            if chrono::Utc::now() > retired_at + self.token_ttl {
                return None;
            }
        }
        Some(&key.decoding)
    }

    /// The public keys as a JWKS document (`/.well-known/jwks.json`).
    #[must_use]
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .iter()
            .map(|(kid, key)| {
                serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
                    "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&key.public),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

/// Creates a new key in `dir` (mode 0600) and returns its id. Ids sort by creation time.
///
/// # Errors
/// When generation or writing fails.
pub fn generate(dir: &Path, development: bool) -> Result<String, KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Generate)?;
    let newest = KeySet::read_dir(dir)?.keys.keys().next_back().cloned();
    // Key ids must sort in creation order (the newest signs): never hand out one that sorts
    // before an existing id, even when two are made within the same microsecond.
    let kid = loop {
        let suffix: String = uuid::Uuid::new_v4().simple().to_string().chars().take(6).collect();
        let kid = format!(
            "{}-{suffix}{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
            if development { "-dev" } else { "" }
        );
        if newest.as_ref().is_none_or(|n| kid.split('-').next() > n.split('-').next()) {
            break kid;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    };
    std::fs::create_dir_all(dir).map_err(|e| KeyError::Io(dir.to_owned(), e))?;
    let path = dir.join(format!("{kid}.pem"));
    let text = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| KeyError::Io(path.clone(), e))?;
    file.write_all(text.as_bytes()).map_err(|e| KeyError::Io(path.clone(), e))?;
    Ok(kid)
}

impl KeySet {
    /// Adds a production key to `dir` (`cairn admin rotate-key`). Running processes reload the
    /// directory every minute (`TokenIssuer::spawn_reload`) and sign with the newest key from then on.
    ///
    /// # Errors
    /// When generation or writing fails.
    pub fn rotate(dir: &Path) -> Result<String, KeyError> {
        generate(dir, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_generates_a_dev_key_and_production_refuses_it() -> Result<(), KeyError> {
        let dir = tempfile::tempdir().map_err(|e| KeyError::Io(PathBuf::new(), e))?;
        assert!(matches!(KeySet::load(dir.path(), true), Err(KeyError::Missing(_))));
        let dev = KeySet::load(dir.path(), false)?;
        assert!(dev.signing_kid().is_some_and(|k| k.ends_with("-dev")));
        assert!(matches!(KeySet::load(dir.path(), true), Err(KeyError::DevelopmentKey(_))));
        Ok(())
    }

    #[test]
    fn a_key_retired_longer_than_a_token_lifetime_stops_verifying() -> Result<(), KeyError> {
        let dir = tempfile::tempdir().map_err(|e| KeyError::Io(PathBuf::new(), e))?;
        let old = KeySet::rotate(dir.path())?;
        std::thread::sleep(std::time::Duration::from_millis(5));
        let new = KeySet::rotate(dir.path())?;
        let set = KeySet::load_with_ttl(dir.path(), true, std::time::Duration::from_secs(60))?;
        assert!(set.decoding(&old).is_some(), "tokens of a just-retired key stay valid");
        let short = KeySet::load_with_ttl(dir.path(), true, std::time::Duration::ZERO)?;
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(short.decoding(&old).is_none(), "a key retired for longer than a token lives verifies nothing");
        assert!(short.decoding(&new).is_some());
        Ok(())
    }

    #[test]
    fn the_newest_key_signs_and_all_are_published() -> Result<(), KeyError> {
        let dir = tempfile::tempdir().map_err(|e| KeyError::Io(PathBuf::new(), e))?;
        let first = KeySet::rotate(dir.path())?;
        let second = KeySet::rotate(dir.path())?;
        let set = KeySet::load(dir.path(), true)?;
        assert_eq!(set.signing_kid(), Some(second.as_str()));
        assert!(first < second);
        assert_eq!(set.jwks()["keys"].as_array().map(Vec::len), Some(2));
        Ok(())
    }
}
