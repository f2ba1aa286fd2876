//! Who may read a file: the one rule every file read (list aside) goes through.
//!
//! The caller holds `files:read` and is the file's owner, an admin, a user it is shared with, any
//! signed-in caller for a `public` file, or a member of a room where a message not deleted has it
//! in `attachments`. Anyone else is told the file does not exist (404, never 403, so ids do not
//! leak). A deletion stops reads at once, before the projection has applied it: the log itself is
//! asked whether the file's stream holds `FileDeleted`.

use cairn_platform::auth::Caller;
use cairn_platform::files::{FileView, FILE_COLUMNS};
use cairn_platform::http::ApiError;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// A file the caller may read, with where its bytes are.
#[derive(Debug, Clone)]
pub struct ReadableFile {
    /// The file as every reader sees it (no shares, no download URL yet).
    pub view: FileView,
    /// The store holding its bytes: `local` or `s3`.
    pub backend: String,
    /// The bytes' key in that store.
    pub storage_key: String,
    /// Whether the caller may see whom it is shared with (its owner and admins).
    pub manages: bool,
}

/// The answer to a file the caller may not read, or that does not exist: the same.
#[must_use]
pub fn file_not_found() -> ApiError {
    ApiError::NotFound("file not found".to_owned())
}

/// File `id`, if `caller` may read it now.
///
/// # Errors
/// FORBIDDEN without `files:read` (or EMAIL_NOT_VERIFIED where the deployment asks for it);
/// NOT_FOUND when the file does not exist, is deleted, or the caller may not read it; a database
/// failure as itself.
pub async fn readable(pool: &PgPool, caller: &Caller, id: Uuid) -> Result<ReadableFile, ApiError> {
    caller.require("files:read")?;
    let admin = caller.is_admin();
    // One statement: the row, the log's word on deletion, and the reader rule, each an index probe
    // (files' key, events' key, file_shares' key, the GIN index on messages.attachments).
    let row = sqlx::query(&format!(
        "SELECT {FILE_COLUMNS}, backend, storage_key FROM files f \
         WHERE f.id = $1 AND f.deleted_at IS NULL \
           AND NOT EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'File' \
                           AND e.aggregate_id = $1::text AND e.event_type = 'FileDeleted') \
           AND ($3 OR f.owner_id = $2 OR f.visibility = 'public' \
                OR EXISTS (SELECT 1 FROM file_shares s WHERE s.file_id = f.id AND s.user_id = $2) \
                OR EXISTS (SELECT 1 FROM messages m \
                           JOIN room_members rm ON rm.room_id = m.room_id AND rm.user_id = $2 \
                           WHERE m.attachments @> ARRAY[f.id] AND m.deleted_at IS NULL))"
    ))
    .bind(id)
    .bind(caller.id())
    .bind(admin)
    .fetch_optional(pool)
    .await?
    .ok_or_else(file_not_found)?;
    let view = FileView::from_row(&row)?;
    let manages = admin || view.owner_id == caller.id();
    Ok(ReadableFile { backend: row.try_get("backend")?, storage_key: row.try_get("storage_key")?, view, manages })
}
