//! The audit keys: Ed25519 keys that sign tree heads, kept apart from the token signing keys
//! (`CAIRN_AUDIT_KEYS_DIR`, one PKCS#8 PEM file per key, named `<key id>.pem`). Key ids sort by
//! creation time; the newest signs. Every key ever used stays published, so heads signed long
//! ago still verify. Development keys carry `-dev` in their id; production refuses them.
//! `cairn admin rotate-audit-key` adds a key.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::Serialize;

/// Why the audit keys could not be loaded or extended.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    /// Reading or writing the directory failed.
    #[error("audit keys directory {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A file is not an Ed25519 PKCS#8 PEM key.
    #[error("{0} is not an Ed25519 PKCS#8 PEM private key")]
    BadKey(PathBuf),
    /// No key and not allowed to make one.
    #[error("no audit key in {0}: run `cairn admin rotate-audit-key` to create one")]
    Missing(PathBuf),
    /// Production with a development key.
    #[error("refusing to start in production with development audit key '{0}': run `cairn admin rotate-audit-key` and remove the -dev key")]
    DevelopmentKey(String),
    /// Key generation failed.
    #[error("audit key generation failed")]
    Generate,
}

struct Key {
    pair: Ed25519KeyPair,
    public: Vec<u8>,
}

/// Every audit key in the directory; the newest signs, all verify.
#[derive(Default)]
pub struct AuditKeys {
    keys: BTreeMap<String, Key>,
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKeys")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("private", &"REDACTED")
            .finish()
    }
}

/// One public audit key, as `/.well-known/audit-keys.json` lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PublicAuditKey {
    /// The key's id (heads name it in `key_id`).
    pub key_id: String,
    /// Always `Ed25519`.
    pub algorithm: &'static str,
    /// The 32-byte Ed25519 public key, hex.
    pub public_key: String,
    /// Whether this key signs new heads (the newest).
    pub signing: bool,
}

impl AuditKeys {
    /// Loads the keys in `dir`. With none there, development generates a `-dev` key and
    /// production fails; production also refuses any `-dev` key.
    ///
    /// # Errors
    /// See [`AuditKeyError`].
    pub fn load(dir: &Path, production: bool) -> Result<Self, AuditKeyError> {
        let mut set = Self::read_dir(dir)?;
        if set.keys.is_empty() {
            if production {
                return Err(AuditKeyError::Missing(dir.to_owned()));
            }
            let kid = generate(dir, true)?;
            tracing::warn!(kid, dir = %dir.display(), "generated a DEVELOPMENT audit key; production refuses it");
            set = Self::read_dir(dir)?;
        }
        if production {
            if let Some(kid) = set.keys.keys().find(|k| k.ends_with("-dev")) {
                return Err(AuditKeyError::DevelopmentKey(kid.clone()));
            }
        }
        Ok(set)
    }

    /// Reads whatever keys `dir` holds (none when it does not exist), generating nothing: for
    /// processes that only verify.
    ///
    /// # Errors
    /// When the directory or a key cannot be read.
    pub fn read_dir(dir: &Path) -> Result<Self, AuditKeyError> {
        let mut keys = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self { keys }),
            Err(e) => return Err(AuditKeyError::Io(dir.to_owned(), e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| AuditKeyError::Io(dir.to_owned(), e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pem") {
                continue;
            }
            let Some(kid) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|e| AuditKeyError::Io(path.clone(), e))?;
            let der = pem::parse(&text).map_err(|_| AuditKeyError::BadKey(path.clone()))?;
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.contents())
                .map_err(|_| AuditKeyError::BadKey(path.clone()))?;
            let public = pair.public_key().as_ref().to_vec();
            keys.insert(kid, Key { pair, public });
        }
        Ok(Self { keys })
    }

    /// The id of the key that signs new heads.
    #[must_use]
    pub fn signing_key_id(&self) -> Option<&str> {
        self.keys.keys().next_back().map(String::as_str)
    }

    /// Signs `message` with the newest key: its id and the 64-byte signature.
    #[must_use]
    pub fn sign(&self, message: &[u8]) -> Option<(String, Vec<u8>)> {
        let (kid, key) = self.keys.iter().next_back()?;
        Some((kid.clone(), key.pair.sign(message).as_ref().to_vec()))
    }

    /// Whether `signature` is key `key_id`'s Ed25519 signature of `message`.
    #[must_use]
    pub fn verify(&self, key_id: &str, message: &[u8], signature: &[u8]) -> bool {
        self.keys
            .get(key_id)
            .is_some_and(|key| UnparsedPublicKey::new(&ED25519, &key.public).verify(message, signature).is_ok())
    }

    /// Every public key, oldest first.
    #[must_use]
    pub fn public_keys(&self) -> Vec<PublicAuditKey> {
        let newest = self.signing_key_id().map(str::to_owned);
        self.keys
            .iter()
            .map(|(kid, key)| PublicAuditKey {
                key_id: kid.clone(),
                algorithm: "Ed25519",
                public_key: hex::encode(&key.public),
                signing: newest.as_deref() == Some(kid.as_str()),
            })
            .collect()
    }
}

/// Creates a new audit key in `dir` (mode 0600) and returns its id. Ids sort by creation time.
///
/// # Errors
/// When generation or writing fails.
pub fn generate(dir: &Path, development: bool) -> Result<String, AuditKeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| AuditKeyError::Generate)?;
    let newest = AuditKeys::read_dir(dir)?.signing_key_id().map(str::to_owned);
    // Ids must sort in creation order (the newest signs).
    let kid = loop {
        let suffix: String = uuid::Uuid::new_v4().simple().to_string().chars().take(6).collect();
        let kid = format!(
            "audit-{}-{suffix}{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
            if development { "-dev" } else { "" }
        );
        if newest.as_ref().is_none_or(|n| kid.split('-').nth(1) > n.split('-').nth(1)) {
            break kid;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    };
    std::fs::create_dir_all(dir).map_err(|e| AuditKeyError::Io(dir.to_owned(), e))?;
    let path = dir.join(format!("{kid}.pem"));
    let text = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| AuditKeyError::Io(path.clone(), e))?;
    file.write_all(text.as_bytes()).map_err(|e| AuditKeyError::Io(path.clone(), e))?;
    Ok(kid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_key_signs_and_every_key_verifies() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let first = generate(dir.path(), false)?;
        let keys = AuditKeys::load(dir.path(), true)?;
        let (kid, old_signature) = keys.sign(b"head").ok_or_else(|| anyhow::anyhow!("no key"))?;
        assert_eq!(kid, first);
        let second = generate(dir.path(), false)?;
        let keys = AuditKeys::load(dir.path(), true)?;
        assert_eq!(keys.signing_key_id(), Some(second.as_str()));
        assert!(keys.verify(&first, b"head", &old_signature), "an old head still verifies");
        assert!(!keys.verify(&first, b"other", &old_signature));
        assert!(!keys.verify(&second, b"head", &old_signature));
        assert_eq!(keys.public_keys().len(), 2);
        Ok(())
    }

    #[test]
    fn production_refuses_a_development_key_and_an_empty_directory() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(matches!(AuditKeys::load(dir.path(), true), Err(AuditKeyError::Missing(_))));
        let dev = AuditKeys::load(dir.path(), false)?;
        assert!(dev.signing_key_id().is_some_and(|k| k.ends_with("-dev")));
        assert!(matches!(AuditKeys::load(dir.path(), true), Err(AuditKeyError::DevelopmentKey(_))));
        Ok(())
    }
}
