//! SQL over the `users` read table.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// A user as the read API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct UserRow {
    /// Id.
    pub id: Uuid,
    /// Email.
    pub email: String,
    /// Display name.
    pub display_name: String,
    /// `active`, `deactivated` or `deleted`.
    pub status: String,
    /// Roles held.
    pub roles: Vec<String>,
    /// Whether the email is verified.
    pub email_verified: bool,
    /// Registration time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Filters of `GET /api/v1/users`.
#[derive(Debug, Clone, Default)]
pub struct UserFilter {
    /// Substring of email or display name.
    pub q: Option<String>,
    /// Holds this role.
    pub role: Option<String>,
    /// Has this status (deleted users only when asked for).
    pub status: Option<String>,
}

/// A position in a list ordered newest first by `(created_at, id)` (users, rooms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Creation time of the last item shown.
    pub created_at: DateTime<Utc>,
    /// Its id.
    pub id: Uuid,
}

impl Cursor {
    /// Encodes the cursor opaquely.
    #[must_use]
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{}|{}",
            self.created_at.timestamp_micros(),
            self.id
        ))
    }

    /// Decodes a cursor from `encode`.
    #[must_use]
    pub fn decode(raw: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(raw).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (micros, id) = text.split_once('|')?;
        Some(Self { created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?, id: id.parse().ok()? })
    }
}

const COLUMNS: &str = "id, email, display_name, status, roles, email_verified, created_at, updated_at";

/// One user by id.
///
/// # Errors
/// When the query fails.
pub async fn find(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<UserRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM users WHERE id = $1")).bind(id).fetch_optional(pool).await
}

/// A page of users, newest first, and the cursor of the next page.
///
/// # Errors
/// When the query fails.
pub async fn list(
    pool: &PgPool,
    filter: &UserFilter,
    after: Option<Cursor>,
    limit: i64,
) -> sqlx::Result<(Vec<UserRow>, Option<Cursor>)> {
    let pattern =
        filter.q.as_ref().map(|q| format!("%{}%", q.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
    let mut rows: Vec<UserRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM users \
         WHERE ($1::text IS NULL OR email ILIKE $1 OR display_name ILIKE $1) \
           AND ($2::text IS NULL OR roles @> ARRAY[$2::text]) \
           AND (CASE WHEN $3::text IS NULL THEN status <> 'deleted' ELSE status = $3 END) \
           AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5)) \
         ORDER BY created_at DESC, id DESC LIMIT $6"
    ))
    .bind(pattern)
    .bind(&filter.role)
    .bind(&filter.status)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        rows.last().map(|r| Cursor { created_at: r.created_at, id: r.id })
    } else {
        None
    };
    Ok((rows, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap_or_default(),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("not-a-cursor"), None);
    }
}
