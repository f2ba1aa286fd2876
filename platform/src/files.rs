//! What the command side, the read side and the sockets share about files: the one JSON shape a
//! file has everywhere (the upload's answer, lists, metadata).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A file as every reader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileView {
    /// The file's id.
    pub id: Uuid,
    /// Who uploaded it.
    pub owner_id: Uuid,
    /// The original name, sanitised (no path, no control characters, at most 255 characters).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The content type sniffed from the bytes.
    pub content_type: String,
    /// SHA-256 of the bytes, lowercase hex (also the download's `ETag`).
    pub sha256: String,
    /// `private` or `public`.
    pub visibility: String,
    /// When it was uploaded.
    pub created_at: DateTime<Utc>,
    /// The users it is shared with: shown to its owner and admins only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_with: Option<Vec<Uuid>>,
    /// A download URL that needs no `Authorization` header (for `<img src>`), valid for
    /// `CAIRN_FILES_URL_TTL_SECS`: given by `GET /files/{id}` to those who may read the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_url: Option<String>,
}

/// The columns of `files` that [`FileView::from_row`] reads, in a `SELECT`.
pub const FILE_COLUMNS: &str = "id, owner_id, name, size, content_type, sha256, visibility, created_at";

impl FileView {
    /// Reads one row selected with [`FILE_COLUMNS`] (no shares, no download URL).
    ///
    /// # Errors
    /// When a column is missing or of another type.
    pub fn from_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<Self> {
        use sqlx::Row;
        let size: i64 = row.try_get("size")?;
        Ok(Self {
            id: row.try_get("id")?,
            owner_id: row.try_get("owner_id")?,
            name: row.try_get("name")?,
            size: u64::try_from(size).unwrap_or_default(),
            content_type: row.try_get("content_type")?,
            sha256: row.try_get("sha256")?,
            visibility: row.try_get("visibility")?,
            created_at: row.try_get("created_at")?,
            shared_with: None,
            download_url: None,
        })
    }
}
