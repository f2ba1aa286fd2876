//! The local store: one encrypted file per object under `dir/files/`, written to `dir/partial/`
//! first and renamed when whole, so a reader never sees half an object.
//!
//! # Format (version 1)
//!
//! ```text
//! header:  "CAIRNENC" (8 bytes) · version 1 (1 byte)
//!          · key id length (1 byte) · master key id (UTF-8)
//!          · wrap nonce (24 bytes) · wrapped data key (32 + 16-byte tag)
//!          · stream nonce (19 bytes)
//! chunks:  ciphertext of 64 KiB of plaintext + 16-byte tag, the last chunk 0 to 64 KiB + tag
//! ```
//!
//! Each file has a fresh random data key, wrapped (XChaCha20Poly1305, random nonce) by the
//! newest master key; the wrap's associated data is the header up to the key id plus the object
//! key, so a header copied onto another object does not open. The body is RustCrypto's STREAM
//! construction (`StreamBE32` over XChaCha20Poly1305): each chunk's nonce carries its position
//! and a last-chunk flag, so chunks cannot be reordered, and a file cut at a chunk boundary fails
//! on what is then its last chunk. Every chunk's associated data is the whole header plus the
//! object key: a chunk moved from another file (or another object's header) fails too.
//!
//! Chunks have a fixed size, so the plaintext size follows from the file's length and a ranged
//! read seeks straight to the chunks it covers and decrypts only those. Any authentication
//! failure is [`StoreError::Corrupt`] with a log line naming key and chunk; no byte of a chunk is
//! returned before its tag has been checked.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use uuid::Uuid;

use crate::keys::MasterKeys;
use crate::{ByteRange, ByteStream, Object, StoreError, StoredObject};

const MAGIC: &[u8; 8] = b"CAIRNENC";
const VERSION: u8 = 1;
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
/// Stored bytes per full chunk.
const SEALED_CHUNK: u64 = (CHUNK + TAG) as u64;
const WRAP_NONCE: usize = 24;
const WRAPPED_KEY: usize = 32 + TAG;
/// XChaCha20's 24-byte nonce minus STREAM's 5 bytes of position and flag.
const STREAM_NONCE: usize = 19;

type Stream = StreamBE32<XChaCha20Poly1305>;

/// Objects as encrypted files under `dir/files/`, written to `dir/partial/` first.
pub struct LocalStore {
    dir: PathBuf,
    keys: Arc<MasterKeys>,
}

fn unavailable(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn joined(e: tokio::task::JoinError) -> StoreError {
    StoreError::Unavailable(format!("a file store task failed: {e}"))
}

/// An authentication failure: logged with key and chunk, never returned as data.
fn corrupt(key: &str, chunk: u64, why: &str) -> StoreError {
    tracing::error!(key, chunk, why, "stored file failed authentication; no byte of it is served");
    StoreError::Corrupt { key: key.to_owned(), chunk }
}

/// A file's header, read and authenticated: what decrypts its chunks.
struct Opened {
    stream: Stream,
    /// Associated data of every chunk: the header bytes, then the object key.
    aad: Vec<u8>,
    header_len: u64,
    chunks: u64,
    size: u64,
}

impl Opened {
    /// Reads chunk `index` at its place in `file` and decrypts it.
    fn read_chunk(&self, file: &std::fs::File, key: &str, index: u64) -> Result<Bytes, StoreError> {
        let offset = self.header_len + index * SEALED_CHUNK;
        let last = index + 1 == self.chunks;
        let len = if last { self.size - index * CHUNK as u64 + TAG as u64 } else { SEALED_CHUNK };
        let mut buffer = vec![0u8; usize::try_from(len).map_err(|_| corrupt(key, index, "chunk length"))?];
        match file.read_exact_at(&mut buffer, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(corrupt(key, index, "file shorter than its chunks"))
            }
            Err(e) => return Err(unavailable(e)),
        }
        let position = u32::try_from(index).map_err(|_| corrupt(key, index, "chunk position"))?;
        self.stream
            .decrypt_in_place(position, last, &self.aad, &mut buffer)
            .map_err(|_| corrupt(key, index, "chunk tag mismatch"))?;
        Ok(Bytes::from(buffer))
    }
}

/// What encrypts a file's chunks as it is written.
struct Sealing {
    stream: Stream,
    /// Associated data of every chunk: the header bytes, then the object key.
    aad: Vec<u8>,
}

impl Sealing {
    /// Encrypts `pending` as chunk `position` and writes it at `offset`, off the async threads;
    /// hands the buffer back emptied, with the bytes written.
    async fn append(
        self: &Arc<Self>,
        file: &Arc<std::fs::File>,
        mut pending: Vec<u8>,
        offset: u64,
        position: u32,
        last: bool,
    ) -> Result<(Vec<u8>, u64), StoreError> {
        let (sealing, file) = (Arc::clone(self), Arc::clone(file));
        tokio::task::spawn_blocking(move || {
            sealing
                .stream
                .encrypt_in_place(position, last, &sealing.aad, &mut pending)
                .map_err(|_| StoreError::Unavailable("encryption failed".into()))?;
            file.write_all_at(&pending, offset).map_err(unavailable)?;
            let written = pending.len() as u64;
            pending.clear();
            Ok((pending, written))
        })
        .await
        .map_err(joined)?
    }
}

/// A file in `partial/` that is removed when dropped, unless it was renamed into place.
struct PartialFile(Option<PathBuf>);

impl PartialFile {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "could not remove a partial upload; the sweeper will");
                }
            }
        }
    }
}

impl LocalStore {
    /// Opens (creating) the directory.
    pub async fn open(dir: &Path, keys: MasterKeys) -> Result<Self, StoreError> {
        for sub in ["files", "partial"] {
            tokio::fs::create_dir_all(dir.join(sub))
                .await
                .map_err(|e| StoreError::Config(format!("{}: {e}", dir.display())))?;
        }
        Ok(Self { dir: dir.to_owned(), keys: Arc::new(keys) })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let id = crate::FileStore::file_id_of(key).ok_or_else(|| StoreError::NotFound(key.to_owned()))?;
        Ok(self.dir.join("files").join(id.to_string()))
    }

    /// A fresh data key wrapped by the writing master key, and the header that carries it.
    fn seal_header(&self, key: &str) -> Result<(Vec<u8>, Stream), StoreError> {
        let master = self.keys.writer();
        let id = master.id().as_bytes();
        let id_len = u8::try_from(id.len()).map_err(|_| StoreError::Config("master key id too long".into()))?;
        let mut header = Vec::with_capacity(MAGIC.len() + 2 + id.len() + WRAP_NONCE + WRAPPED_KEY + STREAM_NONCE);
        header.extend_from_slice(MAGIC);
        header.push(VERSION);
        header.push(id_len);
        header.extend_from_slice(id);
        let data_key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let wrap_nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let wrap_aad = [header.as_slice(), key.as_bytes()].concat();
        let wrapped = master
            .cipher()
            .encrypt(&wrap_nonce, Payload { msg: &data_key, aad: &wrap_aad })
            .map_err(|_| StoreError::Unavailable("wrapping the data key failed".into()))?;
        header.extend_from_slice(&wrap_nonce);
        header.extend_from_slice(&wrapped);
        // STREAM's nonce is the random part of an XChaCha20 nonce: the rest is position and flag.
        let random = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let stream_nonce = &random[..STREAM_NONCE];
        header.extend_from_slice(stream_nonce);
        let stream = Stream::new(&data_key, GenericArray::from_slice(stream_nonce));
        Ok((header, stream))
    }

    /// Reads and authenticates the header of `file` (`len` bytes long).
    fn open_header(keys: &MasterKeys, file: &std::fs::File, len: u64, key: &str) -> Result<Opened, StoreError> {
        let bad = |why: &str| corrupt(key, 0, why);
        let mut prefix = [0u8; 10];
        file.read_exact_at(&mut prefix, 0).map_err(|_| bad("file shorter than a header"))?;
        if &prefix[..8] != MAGIC || prefix[8] != VERSION {
            return Err(bad("not a cairn encrypted file of a known version"));
        }
        let id_len = usize::from(prefix[9]);
        let header_len = 10 + id_len + WRAP_NONCE + WRAPPED_KEY + STREAM_NONCE;
        let mut header = vec![0u8; header_len];
        file.read_exact_at(&mut header, 0).map_err(|_| bad("file shorter than its header"))?;
        let id_end = 10 + id_len;
        let id = std::str::from_utf8(&header[10..id_end]).map_err(|_| bad("master key id is not UTF-8"))?;
        let Some(master) = keys.get(id) else {
            tracing::error!(
                key,
                master_key_id = id,
                "no master key with this id (removed from the key file, or the header is damaged)"
            );
            return Err(bad("unknown master key id"));
        };
        let wrap_nonce = &header[id_end..id_end + WRAP_NONCE];
        let wrapped = &header[id_end + WRAP_NONCE..id_end + WRAP_NONCE + WRAPPED_KEY];
        let stream_nonce = &header[id_end + WRAP_NONCE + WRAPPED_KEY..];
        let wrap_aad = [&header[..id_end], key.as_bytes()].concat();
        let data_key = master
            .cipher()
            .decrypt(GenericArray::from_slice(wrap_nonce), Payload { msg: wrapped, aad: &wrap_aad })
            .map_err(|_| bad("wrapped data key failed authentication"))?;
        if data_key.len() != 32 {
            return Err(bad("wrapped data key has the wrong length"));
        }
        let stream = Stream::from_aead(
            XChaCha20Poly1305::new(GenericArray::from_slice(&data_key)),
            GenericArray::from_slice(stream_nonce),
        );

        // Every chunk but the last is full and the last holds 0 to CHUNK bytes, so the length
        // says how many chunks there are; a length no such layout gives is a cut-off file.
        let header_len = header_len as u64;
        let body = len.saturating_sub(header_len);
        let full = body / SEALED_CHUNK;
        let rest = body % SEALED_CHUNK;
        let chunks = match (full, rest) {
            (0, 0) => return Err(corrupt(key, 0, "no chunk after the header")),
            (full, 0) => full,
            (full, rest) if rest >= TAG as u64 => full + 1,
            (full, _) => return Err(corrupt(key, full, "file cut inside a chunk")),
        };
        let size = body - chunks * TAG as u64;
        let aad = [header.as_slice(), key.as_bytes()].concat();
        Ok(Opened { stream, aad, header_len, chunks, size })
    }

    pub async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, StoreError> {
        let target = self.path(key)?;
        let partial = self.dir.join("partial").join(format!("{}.{}", Uuid::new_v4(), key.replace('/', "_")));
        let (header, stream) = self.seal_header(key)?;
        let sealing = Arc::new(Sealing { stream, aad: [header.as_slice(), key.as_bytes()].concat() });
        // Removes the partial file unless disarmed: on an error and when the caller gives up on
        // the upload (its future dropped mid-body) alike.
        let guard = PartialFile(Some(partial.clone()));
        let file = {
            let partial = partial.clone();
            tokio::task::spawn_blocking(move || {
                let file = std::fs::File::create(&partial)?;
                file.write_all_at(&header, 0)?;
                Ok::<_, std::io::Error>((Arc::new(file), header.len() as u64))
            })
        };
        let (file, mut offset) = file.await.map_err(joined)?.map_err(unavailable)?;
        let mut position: u32 = 0;
        let mut size = 0u64;
        let mut pending = Vec::with_capacity(CHUNK + TAG);
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(StoreError::Source)?;
            size += piece.len() as u64;
            let mut piece = &piece[..];
            while !piece.is_empty() {
                // A full chunk is sealed only once more bytes arrive: the last chunk carries the
                // last-chunk flag, and only the end of the body says which one that is.
                if pending.len() == CHUNK {
                    let (emptied, written) = sealing.append(&file, pending, offset, position, false).await?;
                    pending = emptied;
                    offset += written;
                    position = position
                        .checked_add(1)
                        .ok_or_else(|| StoreError::Unavailable("file too large for the chunk counter".into()))?;
                }
                let take = piece.len().min(CHUNK - pending.len());
                pending.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
            }
        }
        sealing.append(&file, pending, offset, position, true).await?;
        let synced = Arc::clone(&file);
        tokio::task::spawn_blocking(move || synced.sync_all()).await.map_err(joined)?.map_err(unavailable)?;
        drop(file);
        tokio::fs::rename(&partial, &target).await.map_err(unavailable)?;
        guard.disarm();
        Ok(size)
    }

    pub async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Object, StoreError> {
        let path = self.path(key)?;
        let (keys, owned_key) = (Arc::clone(&self.keys), key.to_owned());
        let (file, opened) = tokio::task::spawn_blocking(move || {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound(owned_key)),
                Err(e) => return Err(unavailable(e)),
            };
            let len = file.metadata().map_err(unavailable)?.len();
            let opened = Self::open_header(&keys, &file, len, &owned_key)?;
            Ok((file, opened))
        })
        .await
        .map_err(joined)??;
        let size = opened.size;
        let (start, end) = match range {
            None if size == 0 => {
                // Nothing to send, but the empty last chunk still proves the file whole.
                let key = key.to_owned();
                tokio::task::spawn_blocking(move || opened.read_chunk(&file, &key, 0)).await.map_err(joined)??;
                return Ok(Object { size, body: futures::stream::empty().boxed() });
            }
            None => (0, size - 1),
            Some(r) if r.start >= size => return Err(StoreError::RangeNotSatisfiable { size }),
            Some(r) => (r.start, r.end.min(size - 1)),
        };
        let first = start / CHUNK as u64;
        let last = end / CHUNK as u64;
        let file = Arc::new(file);
        let opened = Arc::new(opened);
        let key: Arc<str> = key.into();

        // Reads and decrypts chunk `index`, trimmed to the range.
        let chunk_of = move |index: u64| {
            let (file, opened, key) = (Arc::clone(&file), Arc::clone(&opened), Arc::clone(&key));
            async move {
                let plain = tokio::task::spawn_blocking(move || opened.read_chunk(&file, &key, index))
                    .await
                    .map_err(joined)??;
                let base = index * CHUNK as u64;
                let from = usize::try_from(start.saturating_sub(base)).unwrap_or(0);
                let to = usize::try_from((end + 1 - base).min(plain.len() as u64)).unwrap_or(plain.len());
                Ok::<_, StoreError>(plain.slice(from..to))
            }
        };
        // The first chunk is checked before answering, so a damaged file is an error, not a
        // response that breaks off.
        let head = chunk_of(first).await?;
        let rest =
            futures::stream::iter(first + 1..=last).then(chunk_of).map_err(|e| std::io::Error::other(e.to_string()));
        let body = futures::stream::once(async move { Ok(head) }).chain(rest).boxed();
        Ok(Object { size, body })
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Objects under `files/` written before `before`; partial files older than that (left by a
    /// process that died mid-upload) are removed on the way, as S3's stale multipart uploads are
    /// aborted.
    pub fn list_before(&self, before: DateTime<Utc>) -> BoxStream<'static, Result<StoredObject, StoreError>> {
        let partial = self.dir.join("partial");
        let stale_partials = async move {
            let mut entries = tokio::fs::read_dir(&partial).await.map_err(unavailable)?;
            while let Some(entry) = entries.next_entry().await.map_err(unavailable)? {
                let modified: DateTime<Utc> =
                    entry.metadata().await.map_err(unavailable)?.modified().map_err(unavailable)?.into();
                if modified < before {
                    match tokio::fs::remove_file(entry.path()).await {
                        Ok(()) => tracing::info!(file = %entry.path().display(), "removed a stale partial upload"),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(unavailable(e)),
                    }
                }
            }
            Ok::<_, StoreError>(())
        };
        let dir = self.dir.join("files");
        let entries = async move {
            stale_partials.await?;
            tokio::fs::read_dir(dir).await.map_err(unavailable)
        };
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
