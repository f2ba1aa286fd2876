//! `POST /api/v1/files`: a multipart body streamed to the file store, chunk by chunk, through a
//! SHA-256, a byte count against `CAIRN_MAX_UPLOAD_BYTES` and the owner's quota, after its type
//! was sniffed from its first bytes. FileUploaded is appended only once every byte is stored.
//!
//! The order of work makes every failure leave nothing behind, or leave it for the sweeper:
//! 1. the `file_uploads` row is written (autocommit) before the first byte is stored;
//! 2. bytes are stored only once reserved against the quota ([`super::quota`]);
//! 3. FileUploaded is appended, and its trigger removes the row and turns the reservation into
//!    stored bytes in the same transaction.
//!
//! A failure before 3 removes the row (giving the reservation back) and then the bytes; a client
//! that goes away drops the handler, and [`PendingUpload`]'s `Drop` does the same on a task of
//! its own. What a crash leaves (a row, perhaps bytes) is the orphan sweeper's. No transaction
//! is open while bytes are stored.

use std::io;

use axum::body::Bytes;
use axum::extract::multipart::{Field, MultipartError};
use axum::extract::Multipart;
use axum::http::StatusCode;
use cairn_domain::{FileCommand, FileName, FileVisibility};
use cairn_platform::auth::Caller;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::files::FileView;
use cairn_platform::http::{ApiError, RequestContext};
use cairn_storage::{ByteStream, FileStore, StoreError};
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::quota::{self, Reservation};
use super::FileCommands;

/// The first bytes the content type is sniffed from.
pub const SNIFF_BYTES: usize = 8 * 1024;

/// Room in the request body for the multipart framing around the file: boundaries, part
/// headers (a long file name included) and the `visibility` field.
pub const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// The longest `visibility` value read (the valid ones are shorter).
const VISIBILITY_MAX: usize = 16;

/// Chunks on their way to the store at once: with the store's own buffer, what one upload holds
/// in memory, however large the file.
const CHUNKS_IN_FLIGHT: usize = 4;

/// What the rest of a refused body may cost to read, so the client gets its answer instead of a
/// connection reset; past it the connection is closed.
const DRAIN_BYTES: u64 = 4 * 1024 * 1024;

/// A file's bytes stored under `key`, not yet recorded.
struct StoredFile {
    id: Uuid,
    key: String,
    name: FileName,
    size: u64,
    content_type: String,
    sha256: String,
}

impl FileCommands {
    /// Stores the `file` field of `multipart` and records it as the caller's (FileUploaded).
    /// `content_length` is the request's, when it gave one: it is reserved against the quota up
    /// front. Needs `files:write`.
    ///
    /// # Errors
    /// VALIDATION_FAILED (no `file` field, two, a bad `visibility`); MALFORMED_REQUEST (an unknown
    /// field, a body that is no multipart or is cut off); PAYLOAD_TOO_LARGE (over
    /// `CAIRN_MAX_UPLOAD_BYTES` or the quota); UNSUPPORTED_MEDIA_TYPE; 5xx when Postgres or the
    /// store fails. Whatever the failure, nothing stays recorded or stored.
    pub async fn upload(
        &self,
        caller: &Caller,
        content_length: Option<u64>,
        mut multipart: Multipart,
        ctx: &RequestContext,
    ) -> Result<(FileView, ConsistencyToken), ApiError> {
        caller.require("files:write")?;
        let mut pending = PendingUpload::default();
        let result = self.receive(caller, content_length, &mut multipart, ctx, &mut pending).await;
        if let Err(refused) = &result {
            pending.clean_up().await;
            tracing::info!(owner_id = %caller.id(), status = refused.status_and_code().0.as_u16(), "upload refused");
            // A client still sending reads its answer only once its body is taken.
            if !matches!(refused, ApiError::Malformed(_)) {
                drain(&mut multipart).await;
            }
        }
        result
    }

    async fn receive(
        &self,
        caller: &Caller,
        content_length: Option<u64>,
        multipart: &mut Multipart,
        ctx: &RequestContext,
        pending: &mut PendingUpload,
    ) -> Result<(FileView, ConsistencyToken), ApiError> {
        let mut visibility = None;
        let mut stored: Option<StoredFile> = None;
        while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
            match field.name().unwrap_or_default() {
                "file" if stored.is_some() => {
                    return Err(ApiError::field("file", "exactly one 'file' field is taken, not two"));
                }
                "file" => stored = Some(self.store(caller, content_length, &mut field, pending).await?),
                "visibility" if visibility.is_some() => {
                    return Err(ApiError::field("visibility", "given twice"));
                }
                "visibility" => visibility = Some(read_visibility(&mut field).await?),
                other => return Err(ApiError::UnknownField(other.to_owned())),
            }
        }
        let Some(file) = stored else {
            return Err(ApiError::field("file", "a multipart field named 'file' holding the file is required"));
        };
        if !self.limits.fault_pause.is_zero() {
            // Test knob (refused in production): the window in which a crash leaves stored bytes
            // that no event names.
            tracing::warn!(file_id = %file.id, pause_ms = self.limits.fault_pause.as_millis(), "pausing before the append");
            tokio::time::sleep(self.limits.fault_pause).await;
        }
        let visibility = visibility.unwrap_or_default();
        let command = FileCommand::RecordUpload {
            owner_id: caller.id(),
            name: file.name.clone(),
            size: file.size,
            content_type: file.content_type.clone(),
            sha256: file.sha256.clone(),
            visibility,
            backend: self.store.backend().as_str().to_owned(),
            key: file.key.clone(),
        };
        let token = self.files.execute(&file.id.to_string(), command, ctx, Some(caller.id())).await?;
        // Recorded: from here on the bytes belong to the file, whatever happens to this request.
        pending.disarm();
        tracing::info!(file_id = %file.id, owner_id = %caller.id(), size = file.size, content_type = %file.content_type, "file uploaded");
        let created_at = self.uploaded_at(file.id).await?;
        let view = FileView {
            id: file.id,
            owner_id: caller.id(),
            name: file.name.into_string(),
            size: file.size,
            content_type: file.content_type,
            sha256: file.sha256,
            visibility: visibility.as_str().to_owned(),
            created_at,
            shared_with: Some(Vec::new()),
            download_url: None,
        };
        Ok((view, token))
    }

    /// Streams the `file` field to the store: sniffs its type from the first bytes (refusing it
    /// before anything is stored), registers the upload, then stores the bytes as they come,
    /// each chunk counted, hashed and reserved before it is passed on.
    async fn store(
        &self,
        caller: &Caller,
        content_length: Option<u64>,
        field: &mut Field<'_>,
        pending: &mut PendingUpload,
    ) -> Result<StoredFile, ApiError> {
        let max = self.limits.max_upload_bytes;
        let name = FileName::sanitise(field.file_name().unwrap_or_default());
        let declared = field.content_type().map(str::to_owned);

        let mut head = Vec::with_capacity(SNIFF_BYTES);
        let mut ended = false;
        while head.len() < SNIFF_BYTES {
            match field.chunk().await.map_err(multipart_error)? {
                Some(chunk) => {
                    if (head.len() + chunk.len()) as u64 > max {
                        return Err(too_large(max));
                    }
                    head.extend_from_slice(&chunk);
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        let window = &head[..head.len().min(SNIFF_BYTES)];
        let sniffed = sniff(window, ended && head.len() <= SNIFF_BYTES);
        let content_type = agree(sniffed, declared.as_deref(), &self.limits.allowed_types)?;

        let id = Uuid::new_v4();
        let key = FileStore::key_for(id);
        let owner = caller.id();
        let backend = self.store.backend().as_str();
        quota::register(&self.pool, id, owner, backend, &key, self.clock.now()).await?;
        pending.arm(PendingCleanup {
            pool: self.pool.clone(),
            store: self.store.clone(),
            file_id: id,
            key: key.clone(),
        });
        let mut reservation = Reservation::new(id, owner, self.limits.quota_bytes, max, content_length);
        reservation.cover(&self.pool, head.len() as u64).await?;

        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        digest.update(&head);
        let mut size = head.len() as u64;
        let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
        let body: ByteStream = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        })
        .boxed();
        let pool = &self.pool;
        let feeding = async {
            let fed =
                feed(field, Bytes::from(head), ended, &sender, pool, &mut reservation, &mut digest, &mut size, max)
                    .await;
            if fed.is_err() {
                // The store sees the body fail and keeps nothing under the key.
                let _ = sender.send(Err(io::Error::other("the upload was refused"))).await;
            }
            drop(sender);
            fed
        };
        let (put, fed) = tokio::join!(self.store.put(&key, body), feeding);
        match (fed, put) {
            (Err(Feed::Refused(refused)), _) => return Err(refused),
            (Ok(()), Err(e)) | (Err(Feed::StoreStopped), Err(e)) => return Err(store_failed(&e)),
            (Err(Feed::StoreStopped), Ok(_)) => {
                return Err(ApiError::Internal(anyhow::anyhow!("the store stopped reading an upload it then kept")));
            }
            (Ok(()), Ok(written)) if written != size => {
                return Err(ApiError::Internal(anyhow::anyhow!("the store kept {written} of {size} bytes")));
            }
            (Ok(()), Ok(_)) => {}
        }
        let sha256 = digest.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok(StoredFile { id, key, name, size, content_type, sha256 })
    }

    /// When FileUploaded of `id` was recorded (the file's `created_at` everywhere).
    async fn uploaded_at(&self, id: Uuid) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
        let at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT recorded_at FROM events WHERE aggregate_type = 'File' AND aggregate_id = $1 AND sequence = 1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        at.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("file {id} recorded but not in the log")))
    }
}

/// Why feeding the store stopped.
enum Feed {
    /// The upload is refused (too large, over quota, a broken body): the answer.
    Refused(ApiError),
    /// The store stopped reading: its own error is the answer.
    StoreStopped,
}

impl From<ApiError> for Feed {
    fn from(e: ApiError) -> Self {
        Self::Refused(e)
    }
}

/// Passes the head and then the rest of the field to the store, each chunk counted against
/// `max`, reserved and hashed before it goes.
#[allow(clippy::too_many_arguments)]
async fn feed(
    field: &mut Field<'_>,
    head: Bytes,
    ended: bool,
    sender: &mpsc::Sender<io::Result<Bytes>>,
    pool: &PgPool,
    reservation: &mut Reservation,
    digest: &mut ring::digest::Context,
    size: &mut u64,
    max: u64,
) -> Result<(), Feed> {
    sender.send(Ok(head)).await.map_err(|_| Feed::StoreStopped)?;
    if ended {
        return Ok(());
    }
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        let total = *size + chunk.len() as u64;
        if total > max {
            return Err(too_large(max).into());
        }
        reservation.cover(pool, total).await?;
        digest.update(&chunk);
        *size = total;
        sender.send(Ok(chunk)).await.map_err(|_| Feed::StoreStopped)?;
    }
    Ok(())
}

/// The content type of a file whose first bytes are `head` (`complete` when they are the whole
/// file): what `infer` recognises; else valid UTF-8 without NUL is `text/plain`, anything else
/// `application/octet-stream`.
#[must_use]
pub fn sniff(head: &[u8], complete: bool) -> String {
    if let Some(kind) = infer::get(head) {
        return kind.mime_type().to_owned();
    }
    let text = match std::str::from_utf8(head) {
        Ok(_) => true,
        // The sniffed window may end inside a character; the rest of it is in the next bytes.
        Err(e) => !complete && e.error_len().is_none(),
    };
    if text && !head.contains(&0) { "text/plain" } else { "application/octet-stream" }.to_owned()
}

/// A declared content type without parameters, lower-case, with `image/jpg` read as `image/jpeg`.
fn normalise(declared: &str) -> String {
    let bare = declared.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if bare == "image/jpg" {
        "image/jpeg".to_owned()
    } else {
        bare
    }
}

/// Whether `content_type` is text a browser will not run: `text/*` or JSON.
fn is_text(content_type: &str) -> bool {
    content_type.starts_with("text/") || content_type == "application/json"
}

/// The type a file is recorded with, from the `sniffed` one and the part's `declared` one, when
/// they agree and it is `allowed`: no declared type (or `application/octet-stream`) takes the
/// sniffed one; a declared text type over sniffed `text/plain` is kept (CSV, JSON are text to a
/// sniffer); any other difference is refused.
///
/// # Errors
/// UNSUPPORTED_MEDIA_TYPE naming both types, or the type that is not allowed.
pub fn agree(sniffed: String, declared: Option<&str>, allowed: &[String]) -> Result<String, ApiError> {
    let declared = declared.map(normalise).filter(|d| !d.is_empty() && d != "application/octet-stream");
    let chosen = match declared {
        None => sniffed,
        Some(declared) if declared == sniffed => sniffed,
        Some(declared) if sniffed == "text/plain" && is_text(&declared) => declared,
        Some(declared) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the file was declared as {declared} but its bytes are {sniffed}"
            )));
        }
    };
    if allowed.contains(&chosen) {
        Ok(chosen)
    } else {
        Err(ApiError::UnsupportedMediaType(format!("files of type {chosen} are not accepted")))
    }
}

/// Reads the `visibility` field (a few bytes at most).
async fn read_visibility(field: &mut Field<'_>) -> Result<FileVisibility, ApiError> {
    let mut raw = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        raw.extend_from_slice(&chunk);
        if raw.len() > VISIBILITY_MAX {
            break;
        }
    }
    std::str::from_utf8(&raw)
        .ok()
        .and_then(|text| FileVisibility::parse(text.trim()))
        .ok_or_else(|| ApiError::field("visibility", "visibility must be 'private' or 'public'"))
}

/// Reads and drops what is left of a refused body, up to [`DRAIN_BYTES`].
async fn drain(multipart: &mut Multipart) {
    let mut drained = 0_u64;
    while let Ok(Some(mut field)) = multipart.next_field().await {
        while let Ok(Some(chunk)) = field.chunk().await {
            drained += chunk.len() as u64;
            if drained > DRAIN_BYTES {
                return;
            }
        }
    }
}

fn too_large(max: u64) -> ApiError {
    ApiError::LimitExceeded {
        message: format!("the file is larger than the {max} bytes allowed"),
        details: [("max_bytes".to_owned(), max)].into(),
    }
}

/// A body that is no valid multipart, is over the route's limit, or stops before its end (the
/// client went away) is the client's failure.
fn multipart_error(e: MultipartError) -> ApiError {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::BAD_REQUEST => ApiError::Malformed(format!("the multipart body is malformed: {}", e.body_text())),
        _ => ApiError::Malformed("the body could not be read to its end".to_owned()),
    }
}

fn store_failed(e: &StoreError) -> ApiError {
    match e {
        StoreError::Unavailable(_) => ApiError::ServiceUnavailable(e.to_string()),
        _ => ApiError::Internal(anyhow::anyhow!("storing an upload: {e}")),
    }
}

/// What removing an unrecorded upload needs.
struct PendingCleanup {
    pool: PgPool,
    store: FileStore,
    file_id: Uuid,
    key: String,
}

impl PendingCleanup {
    /// Removes the upload's row (giving its reservation back) and then its bytes, unless the row
    /// was gone: then FileUploaded was appended after all, or the sweeper took the upload, and
    /// the bytes are not this request's to remove. A failure here leaves the row to the sweeper.
    async fn run(self) {
        match quota::release(&self.pool, self.file_id).await {
            Ok(true) => {
                if let Err(e) = self.store.delete(&self.key).await {
                    tracing::warn!(file_id = %self.file_id, error = %e, "an unrecorded upload's bytes stay for the sweeper");
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(file_id = %self.file_id, error = %e, "an unrecorded upload stays for the sweeper");
            }
        }
    }
}

/// An upload registered but not yet recorded. Cleaned up on a refusal; dropped armed (the client
/// went away, the request timed out), it cleans up on a task of its own.
#[derive(Default)]
struct PendingUpload(Option<PendingCleanup>);

impl PendingUpload {
    fn arm(&mut self, cleanup: PendingCleanup) {
        self.0 = Some(cleanup);
    }

    fn disarm(&mut self) {
        self.0 = None;
    }

    async fn clean_up(&mut self) {
        if let Some(cleanup) = self.0.take() {
            cleanup.run().await;
        }
    }
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        if let Some(cleanup) = self.0.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(cleanup.run());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<String> {
        cairn_platform::settings::DEFAULT_ALLOWED_TYPES.split(',').map(str::to_owned).collect()
    }

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

    #[test]
    fn the_type_comes_from_the_bytes() {
        assert_eq!(sniff(PNG, true), "image/png");
        assert_eq!(sniff(b"%PDF-1.7\n", true), "application/pdf");
        assert_eq!(sniff(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0>\0", true), "application/x-executable");
        assert_eq!(sniff("plain words, accents é".as_bytes(), true), "text/plain");
        assert_eq!(sniff(b"", true), "text/plain");
        assert_eq!(sniff(b"text\0with a NUL", true), "application/octet-stream");
        assert_eq!(sniff(&[0xff, 0xfe, 0x00, 0x81, 0x02], true), "application/octet-stream");
    }

    #[test]
    fn a_character_cut_by_the_sniffed_window_is_still_text() {
        let cut = &"é".as_bytes()[..1];
        assert_eq!(sniff(cut, false), "text/plain");
        assert_eq!(sniff(cut, true), "application/octet-stream");
    }

    #[test]
    fn the_declared_type_must_agree_with_the_bytes() {
        let allowed = allowed();
        assert_eq!(agree("image/png".into(), None, &allowed).unwrap(), "image/png");
        assert_eq!(agree("image/png".into(), Some("application/octet-stream"), &allowed).unwrap(), "image/png");
        assert_eq!(agree("image/jpeg".into(), Some("image/jpg"), &allowed).unwrap(), "image/jpeg");
        assert_eq!(agree("text/plain".into(), Some("text/csv; charset=utf-8"), &allowed).unwrap(), "text/csv");
        assert_eq!(agree("text/plain".into(), Some("application/json"), &allowed).unwrap(), "application/json");
        let refused = agree("image/png".into(), Some("application/pdf"), &allowed).unwrap_err();
        assert!(
            matches!(&refused, ApiError::UnsupportedMediaType(m) if m.contains("image/png") && m.contains("application/pdf"))
        );
        // Text is not allowed to pass as an image, nor an image as text.
        assert!(agree("text/plain".into(), Some("image/png"), &allowed).is_err());
        assert!(agree("image/png".into(), Some("text/plain"), &allowed).is_err());
    }

    #[test]
    fn only_allowed_types_are_taken() {
        let allowed = allowed();
        assert!(agree("application/x-executable".into(), None, &allowed).is_err());
        // A declared text type must be allowed too.
        assert!(agree("text/plain".into(), Some("text/html"), &allowed).is_err());
        assert!(agree("image/png".into(), None, &["application/pdf".to_owned()]).is_err());
    }
}
