//! Queries of the files read models: the caller's own files, the files shared with them, and
//! whom a file is shared with.

use base64::Engine;
use cairn_platform::files::{FileView, FILE_COLUMNS};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Which files a list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// The caller's own files, newest upload first.
    Own,
    /// The files shared with the caller, most recently shared first.
    SharedWithMe,
}

/// Where a page of files resumes: the position (in the log) of the last one shown, of its upload
/// for [`Listing::Own`], of its share for [`Listing::SharedWithMe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileCursor(pub i64);

impl FileCursor {
    /// Encodes the cursor opaquely.
    #[must_use]
    pub fn encode(self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("f{}", self.0))
    }

    /// Decodes a cursor from [`FileCursor::encode`].
    #[must_use]
    pub fn decode(raw: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(raw).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        text.strip_prefix('f')?.parse().ok().filter(|p| *p > 0).map(Self)
    }
}

/// Whether the log holds the file's deletion: deletion stops reads before the projection has it.
const NOT_DELETED_IN_LOG: &str = "NOT EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'File' \
     AND e.aggregate_id = f.id::text AND e.event_type = 'FileDeleted')";

/// A page of `user`'s files of `listing` after `after`, and the next page's cursor.
///
/// # Errors
/// When the query fails.
pub async fn list(
    pool: &PgPool,
    user: Uuid,
    listing: Listing,
    after: Option<FileCursor>,
    limit: i64,
) -> sqlx::Result<(Vec<FileView>, Option<FileCursor>)> {
    let sql = match listing {
        Listing::Own => format!(
            "SELECT {FILE_COLUMNS}, position AS cursor FROM files f \
             WHERE owner_id = $1 AND deleted_at IS NULL AND ($2::bigint IS NULL OR position < $2) \
               AND {NOT_DELETED_IN_LOG} \
             ORDER BY position DESC LIMIT $3"
        ),
        Listing::SharedWithMe => format!(
            "SELECT {FILE_COLUMNS}, s.position AS cursor FROM file_shares s JOIN files f ON f.id = s.file_id \
             WHERE s.user_id = $1 AND f.deleted_at IS NULL AND ($2::bigint IS NULL OR s.position < $2) \
               AND {NOT_DELETED_IN_LOG} \
             ORDER BY s.position DESC LIMIT $3"
        ),
    };
    let rows = sqlx::query(&sql).bind(user).bind(after.map(|c| c.0)).bind(limit + 1).fetch_all(pool).await?;
    let more = rows.len() as i64 > limit;
    let mut files = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows.iter().take(usize::try_from(limit).unwrap_or(0)) {
        files.push(FileView::from_row(row)?);
        last = Some(FileCursor(row.try_get("cursor")?));
    }
    Ok((files, if more { last } else { None }))
}

/// How many users a file's `shared_with` names at most (the first shared first); a file shared
/// more widely than that is managed through its shares, not read whole here.
pub const SHARED_WITH_CAP: i64 = 1000;

/// The users file `id` is shared with, in the order it was shared with them, at most
/// [`SHARED_WITH_CAP`].
///
/// # Errors
/// When the query fails.
pub async fn shared_with(pool: &PgPool, id: Uuid) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar("SELECT user_id FROM file_shares WHERE file_id = $1 ORDER BY position LIMIT $2")
        .bind(id)
        .bind(SHARED_WITH_CAP)
        .fetch_all(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let cursor = FileCursor(7421);
        assert_eq!(FileCursor::decode(&cursor.encode()), Some(cursor));
        for bad in ["", "x", "Zg", &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("f-1")] {
            assert_eq!(FileCursor::decode(bad), None, "{bad}");
        }
    }
}
