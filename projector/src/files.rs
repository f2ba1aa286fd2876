//! The `files` and `file_shares` read models.
//!
//! Every event of a file's stream moves its row's `version` to the event's sequence, and an event
//! changes anything only when it moves it: so an event applied twice (a rebuild over a live table,
//! a retried batch) changes nothing the second time. A file whose `FileUploaded` this table never
//! saw takes no share and no deletion (there is nothing to change).

use cairn_domain::FileEvent;
use cairn_platform::envelope::EventEnvelope;
use serde::Deserialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::Projection;

/// Projects `File` events into `files` and `file_shares`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FilesProjection;

impl Projection for FilesProjection {
    const NAME: &'static str = "files";
    const TABLES: &'static [&'static str] = &["files", "file_shares"];

    fn wants(&self, event: &EventEnvelope) -> bool {
        event.aggregate_type == "File"
    }

    async fn apply(&self, conn: &mut PgConnection, schema: &str, event: &EventEnvelope) -> anyhow::Result<()> {
        let id: Uuid = event.aggregate_id.parse()?;
        let at = event.recorded_at;
        let sequence = event.sequence;
        match FileEvent::deserialize(&event.payload)? {
            FileEvent::FileUploaded { owner_id, name, size, content_type, sha256, visibility, backend, key } => {
                sqlx::query(&format!(
                    "INSERT INTO {schema}.files (id, owner_id, name, size, content_type, sha256, visibility, backend, \
                                                 storage_key, position, created_at, version) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id) DO NOTHING"
                ))
                .bind(id)
                .bind(owner_id)
                .bind(name)
                .bind(i64::try_from(size)?)
                .bind(content_type)
                .bind(sha256)
                .bind(visibility.as_str())
                .bind(backend)
                .bind(key)
                .bind(event.global_position)
                .bind(at)
                .bind(sequence)
                .execute(&mut *conn)
                .await?;
            }
            FileEvent::FileShared { user_id, by } => {
                if advance(conn, schema, id, sequence, None).await? {
                    sqlx::query(&format!(
                        "INSERT INTO {schema}.file_shares (file_id, user_id, shared_by, shared_at, position) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (file_id, user_id) DO NOTHING"
                    ))
                    .bind(id)
                    .bind(user_id)
                    .bind(by)
                    .bind(at)
                    .bind(event.global_position)
                    .execute(&mut *conn)
                    .await?;
                }
            }
            FileEvent::FileUnshared { user_id, .. } => {
                if advance(conn, schema, id, sequence, None).await? {
                    sqlx::query(&format!("DELETE FROM {schema}.file_shares WHERE file_id = $1 AND user_id = $2"))
                        .bind(id)
                        .bind(user_id)
                        .execute(&mut *conn)
                        .await?;
                }
            }
            FileEvent::FileDeleted { .. } => {
                if advance(conn, schema, id, sequence, Some(at)).await? {
                    sqlx::query(&format!("DELETE FROM {schema}.file_shares WHERE file_id = $1"))
                        .bind(id)
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// Moves file `id`'s row to `sequence` (and marks it deleted at `deleted_at`), unless it has taken
/// that event already or does not exist. Returns whether it moved.
async fn advance(
    conn: &mut PgConnection,
    schema: &str,
    id: Uuid,
    sequence: i64,
    deleted_at: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<bool> {
    let moved = sqlx::query(&format!(
        "UPDATE {schema}.files SET version = $2, deleted_at = coalesce($3, deleted_at) \
         WHERE id = $1 AND version < $2"
    ))
    .bind(id)
    .bind(sequence)
    .bind(deleted_at)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(moved > 0)
}
