//! Where the bytes of uploaded files live. Two stores behind one [`FileStore`]: a local
//! directory encrypted at rest, and an S3-compatible object store. Only bytes live here; the
//! facts about a file (owner, name, type, sha256) are events in the log.
//!
//! Keys are `files/<file id>`: the sweeper can tell from a key alone which file it would be.
//!
//! - `local`: the encrypted local store (its format in the module's header);
//! - `keys`: the master keys that wrap each local file's own key, and their rotation;
//! - `s3`: the S3 store (multipart above a part size, presigned downloads).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use uuid::Uuid;

use cairn_platform::settings::{FileStoreKind, FilesSettings};

pub mod keys;
mod local;
mod s3;

pub use keys::{MasterKey, MasterKeys};
pub use local::CHUNK as LOCAL_CHUNK_BYTES;

/// Which kind of store holds a file's bytes (recorded in FileUploaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The encrypted local directory.
    Local,
    /// The S3-compatible object store.
    S3,
}

impl Backend {
    /// `local` or `s3`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::S3 => "s3",
        }
    }
}

/// A body streamed in or out.
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// A range of the plaintext, both ends included, already checked by the caller to be non-empty
/// (`start <= end`); the store refuses one that starts at or past the end of the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte (included).
    pub end: u64,
}

/// An object read back: its whole size, and the bytes asked for (all, or the range).
pub struct Object {
    /// The whole object's size in bytes (plaintext).
    pub size: u64,
    /// The bytes of the range asked for, or of the whole object.
    pub body: ByteStream,
}

/// An object the store holds, as the sweeper lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Its key.
    pub key: String,
    /// When it was last written.
    pub modified: DateTime<Utc>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The body being stored failed (cut off, over a limit the caller enforces): nothing is left
    /// under the key. Carries the body's own error.
    #[error("the body failed: {0}")]
    Source(std::io::Error),
    /// No object under this key.
    #[error("no object under {0}")]
    NotFound(String),
    /// The range starts at or past the end of an object of `size` bytes.
    #[error("range not satisfiable for an object of {size} bytes")]
    RangeNotSatisfiable {
        /// The object's size.
        size: u64,
    },
    /// The stored bytes failed authentication (altered on disk): never returned as data.
    #[error("{key}: stored bytes failed authentication at chunk {chunk}")]
    Corrupt {
        /// The key.
        key: String,
        /// The first chunk that failed.
        chunk: u64,
    },
    /// The store could not be reached or failed (disk, network, S3 error).
    #[error("file store unavailable: {0}")]
    Unavailable(String),
    /// The store is misconfigured (keys, bucket, credentials).
    #[error("file store configuration: {0}")]
    Config(String),
}

/// The store a deployment keeps its files in.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

enum Inner {
    Local(local::LocalStore),
    S3(s3::S3Store),
}

impl FileStore {
    /// Opens the store `settings` names. The local store reads its master keys now (a process
    /// sees a rotated key when it restarts); production refuses a development master key, and
    /// a missing S3 bucket (development creates it).
    ///
    /// # Errors
    /// [`StoreError::Config`] when keys, directory, bucket or credentials are unusable.
    pub async fn open(settings: &FilesSettings, production: bool) -> Result<Self, StoreError> {
        let inner = match settings.store {
            FileStoreKind::Local => {
                let keys = MasterKeys::load(settings.master_key_file.as_deref())?;
                if let Some(key) = keys.development_key().filter(|_| production) {
                    return Err(StoreError::Config(format!(
                        "production refuses the development master key {} (run `cairn admin rotate-files-key` \
                         and remove every key whose id ends in `{}` from CAIRN_FILES_MASTER_KEY_FILE)",
                        key.id(),
                        keys::DEVELOPMENT_SUFFIX
                    )));
                }
                if keys.writer().is_development() {
                    tracing::warn!(
                        master_key_id = keys.writer().id(),
                        "the local file store encrypts with the built-in development key: set CAIRN_FILES_MASTER_KEY_FILE"
                    );
                }
                tracing::info!(dir = %settings.dir.display(), master_key_id = keys.writer().id(), "local file store");
                Inner::Local(local::LocalStore::open(&settings.dir, keys).await?)
            }
            FileStoreKind::S3 => {
                tracing::info!(bucket = settings.s3.bucket, endpoint = ?settings.s3.endpoint, "S3 file store");
                Inner::S3(s3::S3Store::open(&settings.s3, production).await?)
            }
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Which kind of store this is.
    #[must_use]
    pub fn backend(&self) -> Backend {
        match *self.inner {
            Inner::Local(_) => Backend::Local,
            Inner::S3(_) => Backend::S3,
        }
    }

    /// The key a file's bytes are stored under.
    #[must_use]
    pub fn key_for(file_id: Uuid) -> String {
        format!("files/{file_id}")
    }

    /// The file a key belongs to, when it is a key this store made.
    #[must_use]
    pub fn file_id_of(key: &str) -> Option<Uuid> {
        key.strip_prefix("files/").and_then(|id| Uuid::parse_str(id).ok())
    }

    /// Streams `body` under `key`, all or nothing: on any error nothing is left under the key.
    /// Returns the bytes stored (plaintext).
    ///
    /// # Errors
    /// [`StoreError::Source`] when `body` fails; [`StoreError::Unavailable`] when the store does.
    pub async fn put(&self, key: &str, body: ByteStream) -> Result<u64, StoreError> {
        match &*self.inner {
            Inner::Local(store) => store.put(key, body).await,
            Inner::S3(store) => store.put(key, body).await,
        }
    }

    /// Reads `key` back, whole or the `range` of it; a ranged read of the local store decrypts
    /// only the chunks the range covers.
    ///
    /// # Errors
    /// NotFound, RangeNotSatisfiable, Corrupt (on reading the first chunk; a later chunk that
    /// fails ends the body's stream with an error), Unavailable.
    pub async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Object, StoreError> {
        match &*self.inner {
            Inner::Local(store) => store.get(key, range).await,
            Inner::S3(store) => store.get(key, range).await,
        }
    }

    /// A presigned GET URL valid for `ttl`, answering with `content_type` and
    /// `content_disposition`: `Some` for S3, `None` for the local store (which streams instead).
    ///
    /// # Errors
    /// Unavailable or Config when signing fails.
    pub async fn presigned_get(
        &self,
        key: &str,
        ttl: Duration,
        content_type: &str,
        content_disposition: &str,
    ) -> Result<Option<String>, StoreError> {
        match &*self.inner {
            Inner::Local(_) => Ok(None),
            Inner::S3(store) => store.presigned_get(key, ttl, content_type, content_disposition).await.map(Some),
        }
    }

    /// Removes `key`; removing what is not there succeeds (idempotent).
    ///
    /// # Errors
    /// Unavailable.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match &*self.inner {
            Inner::Local(store) => store.delete(key).await,
            Inner::S3(store) => store.delete(key).await,
        }
    }

    /// Every object under `files/` last written before `before`, page by page (bounded memory),
    /// plus what a crashed upload left half-written.
    pub fn list_before(&self, before: DateTime<Utc>) -> BoxStream<'static, Result<StoredObject, StoreError>> {
        match &*self.inner {
            Inner::Local(store) => store.list_before(before),
            Inner::S3(store) => store.list_before(before),
        }
    }
}
