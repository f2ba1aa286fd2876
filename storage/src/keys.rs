//! Master keys of the local store: they wrap each file's own data key, so rotating one means
//! appending a line, never re-encrypting a file.
//!
//! `CAIRN_FILES_MASTER_KEY_FILE` holds one `<key id>:<base64 of 32 bytes>` per line (blank lines
//! and `#` comments allowed). Every key is read, so files wrapped by an older key stay readable;
//! the last line is the one new files are wrapped with. Without the file (development only) a
//! built-in development key is used: its id ends in `-dev` and production refuses any such key.

use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{KeyInit, OsRng};
use chacha20poly1305::XChaCha20Poly1305;

use crate::StoreError;

/// The suffix that marks a development key, which production refuses.
pub const DEVELOPMENT_SUFFIX: &str = "-dev";

/// The id of the built-in development key.
pub const DEVELOPMENT_KEY_ID: &str = "builtin-dev";

/// The built-in development key: public, in the source, so it protects nothing. It exists so a
/// development checkout runs without a key file; production refuses it.
const DEVELOPMENT_KEY: [u8; 32] = *b"cairn development key NOT SECRET";

/// One master key and its id.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    key: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey").field("id", &self.id).field("key", &"REDACTED").finish()
    }
}

impl MasterKey {
    /// Its id, as written in each file's header.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether it is a development key (its id ends in `-dev`).
    #[must_use]
    pub fn is_development(&self) -> bool {
        self.id.ends_with(DEVELOPMENT_SUFFIX)
    }

    /// The cipher that wraps and unwraps data keys with it.
    pub(crate) fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.key.into())
    }
}

/// Every master key the process knows, the writing one last.
#[derive(Clone, Debug)]
pub struct MasterKeys {
    keys: Vec<MasterKey>,
}

impl MasterKeys {
    /// Reads the key file, or the development key when there is none.
    ///
    /// # Errors
    /// [`StoreError::Config`] when the file cannot be read, a line is malformed, an id repeats,
    /// or the file holds no key.
    pub fn load(file: Option<&Path>) -> Result<Self, StoreError> {
        let Some(file) = file else { return Ok(Self::development()) };
        let text = std::fs::read_to_string(file)
            .map_err(|e| StoreError::Config(format!("CAIRN_FILES_MASTER_KEY_FILE {}: {e}", file.display())))?;
        Self::parse(&text)
            .map_err(|e| StoreError::Config(format!("CAIRN_FILES_MASTER_KEY_FILE {}: {e}", file.display())))
    }

    /// The built-in development key alone.
    #[must_use]
    pub fn development() -> Self {
        Self { keys: vec![MasterKey { id: DEVELOPMENT_KEY_ID.to_owned(), key: DEVELOPMENT_KEY }] }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<MasterKey> = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let number = number + 1;
            let (id, encoded) = line.split_once(':').ok_or(format!("line {number}: expected <key id>:<base64 key>"))?;
            let id = id.trim();
            validate_id(id).map_err(|e| format!("line {number}: {e}"))?;
            let bytes = STANDARD
                .decode(encoded.trim())
                .map_err(|e| format!("line {number} (key {id}): the key is not base64: {e}"))?;
            let key: [u8; 32] =
                bytes.try_into().map_err(|_| format!("line {number} (key {id}): the key must be 32 bytes"))?;
            if keys.iter().any(|k| k.id == id) {
                return Err(format!("line {number}: key id {id} appears twice"));
            }
            keys.push(MasterKey { id: id.to_owned(), key });
        }
        if keys.is_empty() {
            return Err("no key in the file (run `cairn admin rotate-files-key`)".to_owned());
        }
        Ok(Self { keys })
    }

    /// The key new files are wrapped with: the last one.
    #[must_use]
    pub fn writer(&self) -> &MasterKey {
        // `parse` and `development` never build an empty set.
        &self.keys[self.keys.len() - 1]
    }

    /// The key with this id.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The first development key among them, if any.
    #[must_use]
    pub fn development_key(&self) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.is_development())
    }
}

fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("a key id is 1 to 64 characters".to_owned());
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("key id {id:?}: only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// Appends a fresh random key to `file` (creating it with mode 0600 when missing) and returns
/// its id: new files are wrapped with it once a process (re)starts, older ones stay readable.
///
/// # Errors
/// [`StoreError::Config`] when the existing file is unreadable or malformed, or it cannot be
/// written.
pub fn append_new_key(file: &Path, now: chrono::DateTime<chrono::Utc>) -> Result<String, StoreError> {
    let config = |e: String| StoreError::Config(format!("CAIRN_FILES_MASTER_KEY_FILE {}: {e}", file.display()));
    let existing = match std::fs::read_to_string(file) {
        Ok(text) if text.trim().is_empty() => None,
        Ok(text) => Some(MasterKeys::parse(&text).map_err(config)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(config(e.to_string())),
    };
    let mut id = format!("k{}", now.format("%Y%m%dT%H%M%SZ"));
    if existing.as_ref().is_some_and(|keys| keys.get(&id).is_some()) {
        // Two rotations within one second: the id stays unique.
        id = format!("{id}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    }
    let key = XChaCha20Poly1305::generate_key(&mut OsRng);
    let line = format!("{id}:{}\n", STANDARD.encode(key));
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut out = options.open(file).map_err(|e| config(e.to_string()))?;
    // A file whose last line lacks its newline would otherwise glue the new key onto it.
    let text = std::fs::read_to_string(file).map_err(|e| config(e.to_string()))?;
    let prefix = if text.is_empty() || text.ends_with('\n') { "" } else { "\n" };
    out.write_all(format!("{prefix}{line}").as_bytes()).map_err(|e| config(e.to_string()))?;
    out.sync_all().map_err(|e| config(e.to_string()))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_last_key_writes_and_every_key_reads() {
        let a = STANDARD.encode([1u8; 32]);
        let b = STANDARD.encode([2u8; 32]);
        let keys = MasterKeys::parse(&format!("# keys\nk1:{a}\n\nk2:{b}\n")).unwrap();
        assert_eq!(keys.writer().id(), "k2");
        assert!(keys.get("k1").is_some());
        assert!(keys.development_key().is_none());
    }

    #[test]
    fn malformed_files_are_refused() {
        let a = STANDARD.encode([1u8; 32]);
        for text in [
            "",
            "k1",
            "k1:notbase64!",
            &format!("k1:{}", STANDARD.encode([1u8; 16])),
            &format!("k1:{a}\nk1:{a}"),
            &format!("a b:{a}"),
        ] {
            assert!(MasterKeys::parse(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn the_development_key_is_marked() {
        assert!(MasterKeys::development().writer().is_development());
    }

    #[test]
    fn rotation_creates_a_private_file_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("master.keys");
        let now = chrono::Utc::now();
        let first = append_new_key(&file, now).unwrap();
        let second = append_new_key(&file, now).unwrap();
        assert_ne!(first, second);
        let keys = MasterKeys::load(Some(&file)).unwrap();
        assert_eq!(keys.writer().id(), second);
        assert!(keys.get(&first).is_some());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
