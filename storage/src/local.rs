//! The local store: one file per object under the store's directory.
//! (Plaintext for now; encryption at rest replaces the body format.)

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use uuid::Uuid;

use crate::{ByteRange, ByteStream, Object, StoreError, StoredObject};

/// Objects as files under `dir/files/`, written to `dir/partial/` first and renamed when whole.
pub struct LocalStore {
    dir: PathBuf,
}

fn unavailable(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl LocalStore {
    /// Opens (creating) the directory.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        for sub in ["files", "partial"] {
            tokio::fs::create_dir_all(dir.join(sub))
                .await
                .map_err(|e| StoreError::Config(format!("{}: {e}", dir.display())))?;
        }
        Ok(Self { dir: dir.to_owned() })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let id = crate::FileStore::file_id_of(key).ok_or_else(|| StoreError::NotFound(key.to_owned()))?;
        Ok(self.dir.join("files").join(id.to_string()))
    }

    pub async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, StoreError> {
        let target = self.path(key)?;
        let partial = self.dir.join("partial").join(format!("{}.{}", Uuid::new_v4(), key.replace('/', "_")));
        let mut file = tokio::fs::File::create(&partial).await.map_err(unavailable)?;
        let result: Result<u64, StoreError> = async {
            let mut written = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(StoreError::Source)?;
                file.write_all(&chunk).await.map_err(unavailable)?;
                written += chunk.len() as u64;
            }
            file.sync_all().await.map_err(unavailable)?;
            Ok(written)
        }
        .await;
        drop(file);
        match result {
            Ok(written) => {
                tokio::fs::rename(&partial, &target).await.map_err(unavailable)?;
                Ok(written)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                Err(e)
            }
        }
    }

    pub async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Object, StoreError> {
        let path = self.path(key)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound(key.to_owned())),
            Err(e) => return Err(unavailable(e)),
        };
        let size = file.metadata().await.map_err(unavailable)?.len();
        let (start, len) = match range {
            None => (0, size),
            Some(r) if r.start >= size => return Err(StoreError::RangeNotSatisfiable { size }),
            Some(r) => (r.start, r.end.min(size - 1) - r.start + 1),
        };
        file.seek(std::io::SeekFrom::Start(start)).await.map_err(unavailable)?;
        let reader = file.take(len);
        let body = tokio_util::io::ReaderStream::new(reader).boxed();
        Ok(Object { size, body })
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    pub fn list_before(&self, before: DateTime<Utc>) -> BoxStream<'static, Result<StoredObject, StoreError>> {
        let dir = self.dir.join("files");
        let entries = async move { tokio::fs::read_dir(dir).await.map_err(unavailable) };
        futures::stream::once(entries)
            .map_ok(|read_dir| {
                futures::stream::unfold(read_dir, |mut rd| async move {
                    match rd.next_entry().await {
                        Ok(Some(entry)) => Some((Ok(entry), rd)),
                        Ok(None) => None,
                        Err(e) => Some((Err(unavailable(e)), rd)),
                    }
                })
            })
            .try_flatten()
            .try_filter_map(move |entry| async move {
                let modified: DateTime<Utc> =
                    entry.metadata().await.map_err(unavailable)?.modified().map_err(unavailable)?.into();
                let name = entry.file_name().to_string_lossy().into_owned();
                Ok((modified < before).then(|| StoredObject { key: format!("files/{name}"), modified }))
            })
            .boxed()
    }
}
