//! SQL over the `rooms`, `room_members`, `messages` and `room_read_markers` tables.
//!
//! Every message query is served by the `(room_id, tx, pos)` index: a page is a range scan of one
//! room's messages in the log's order, in either direction.

use base64::Engine;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::rooms::{columns, MessageView, MESSAGE_COLUMNS};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::users::Cursor;

/// The most unread messages counted per room: a count stops there, so a room with a long
/// backlog costs no more than this to list.
pub const UNREAD_CAP: i64 = 1000;

/// Who is reading: what decides which rooms they see.
#[derive(Debug, Clone, Copy)]
pub struct Reader {
    /// The caller.
    pub user_id: Uuid,
    /// Holds `rooms:write`: sees public rooms it has not joined.
    pub sees_public: bool,
    /// Holds the `admin` role: sees every room.
    pub admin: bool,
}

/// A room as the caller sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RoomView {
    /// Its id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Topic.
    pub topic: Option<String>,
    /// `public` or `private`.
    pub visibility: String,
    /// Who owns it.
    pub owner_id: Uuid,
    /// Archived: read-only.
    pub archived: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// How many members it has.
    pub member_count: i64,
    /// Whether the caller is a member.
    pub joined: bool,
    /// The caller's role in it (`owner` or `member`), `null` when not a member.
    pub role: Option<String>,
    /// Messages not deleted, not written by the caller, after the caller's read marker (all of
    /// them without one): counted up to 1,000 and shown as 1000 beyond that. 0 for a non-member.
    #[schema(maximum = 1000)]
    pub unread: i64,
    /// The newest message not deleted, `null` when there is none.
    pub last_message: Option<MessageView>,
}

/// A member of a room.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct MemberView {
    /// The member.
    pub user_id: Uuid,
    /// Their display name (`null` when the user is not in the users read model).
    pub display_name: Option<String>,
    /// `owner` or `member`.
    pub role: String,
    /// When they joined.
    pub joined_at: DateTime<Utc>,
}

/// A position in a room's member list: owner first, then by `(joined_at, user_id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberCursor {
    not_owner: bool,
    joined_at: DateTime<Utc>,
    user_id: Uuid,
}

impl MemberCursor {
    /// Encodes the cursor opaquely.
    #[must_use]
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{}|{}|{}",
            u8::from(self.not_owner),
            self.joined_at.timestamp_micros(),
            self.user_id
        ))
    }

    /// Decodes a cursor from `encode`.
    #[must_use]
    pub fn decode(raw: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(raw).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.split('|');
        let not_owner = match parts.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let joined_at = DateTime::from_timestamp_micros(parts.next()?.parse().ok()?)?;
        let user_id = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(Self { not_owner, joined_at, user_id })
    }
}

/// The rooms `reader` may see, as a SQL condition over `rooms r` and the reader's membership
/// `room_members m` (joined on `m.user_id = $1`); `$2` is `admin`, `$3` is `sees_public`.
const VISIBLE: &str = "($2 OR m.user_id IS NOT NULL OR ($3 AND r.visibility = 'public'))";

/// The room list's page, or one room, with everything shown about it, in one statement: the
/// rooms first (page or id), then per room its member count, the caller's unread count and the
/// last message, each by index.
fn room_query(filter: &str) -> String {
    format!(
        "SELECT p.*, \
                (SELECT count(*) FROM room_members c WHERE c.room_id = p.r_id) AS member_count, \
                CASE WHEN p.r_role IS NULL THEN 0 ELSE \
                  (SELECT count(*) FROM (SELECT 1 FROM messages u \
                     WHERE u.room_id = p.r_id AND (u.tx, u.pos) > (p.k_tx, p.k_pos) \
                       AND u.deleted_at IS NULL AND u.author_id <> $1 \
                     LIMIT {UNREAD_CAP}) capped) END AS unread, \
                lm.* \
         FROM (SELECT r.id AS r_id, r.name AS r_name, r.topic AS r_topic, r.visibility AS r_visibility, \
                      r.owner_id AS r_owner_id, r.archived_at AS r_archived_at, r.created_at AS r_created_at, \
                      m.role AS r_role, coalesce(k.tx, 0) AS k_tx, coalesce(k.pos, 0) AS k_pos \
               FROM rooms r \
               LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = $1 \
               LEFT JOIN room_read_markers k ON k.room_id = r.id AND k.user_id = $1 \
               WHERE {VISIBLE} AND {filter} \
               ORDER BY r.created_at DESC, r.id DESC LIMIT $4) p \
         LEFT JOIN LATERAL (SELECT {MESSAGE_COLUMNS} FROM messages l \
                            WHERE l.room_id = p.r_id AND l.deleted_at IS NULL \
                            ORDER BY l.tx DESC, l.pos DESC LIMIT 1) lm ON true \
         ORDER BY p.r_created_at DESC, p.r_id DESC"
    )
}

fn room_from_row(row: &PgRow) -> sqlx::Result<RoomView> {
    let role: Option<String> = row.try_get("r_role")?;
    let archived_at: Option<DateTime<Utc>> = row.try_get("r_archived_at")?;
    let has_message = row.try_get::<Option<Uuid>, _>("id")?.is_some();
    Ok(RoomView {
        id: row.try_get("r_id")?,
        name: row.try_get("r_name")?,
        topic: row.try_get("r_topic")?,
        visibility: row.try_get("r_visibility")?,
        owner_id: row.try_get("r_owner_id")?,
        archived: archived_at.is_some(),
        created_at: row.try_get("r_created_at")?,
        member_count: row.try_get("member_count")?,
        joined: role.is_some(),
        role,
        unread: row.try_get("unread")?,
        last_message: if has_message { Some(MessageView::from_row(row)?) } else { None },
    })
}

/// A page of the rooms `reader` may see (with `joined_only`, only those they are a member of),
/// newest first, and the cursor of the next page.
///
/// # Errors
/// When the query fails.
pub async fn list_rooms(
    pool: &PgPool,
    reader: Reader,
    joined_only: bool,
    after: Option<Cursor>,
    limit: i64,
) -> sqlx::Result<(Vec<RoomView>, Option<Cursor>)> {
    let filter = "(NOT $5 OR m.user_id IS NOT NULL) \
                  AND ($6::timestamptz IS NULL OR (r.created_at, r.id) < ($6, $7))";
    let rows = sqlx::query(&room_query(filter))
        .bind(reader.user_id)
        .bind(reader.admin)
        .bind(reader.sees_public)
        .bind(limit + 1)
        .bind(joined_only)
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id))
        .fetch_all(pool)
        .await?;
    let mut rooms = rows.iter().map(room_from_row).collect::<sqlx::Result<Vec<_>>>()?;
    let next = if rooms.len() as i64 > limit {
        rooms.truncate(usize::try_from(limit).unwrap_or(0));
        rooms.last().map(|r| Cursor { created_at: r.created_at, id: r.id })
    } else {
        None
    };
    Ok((rooms, next))
}

/// Room `id` as `reader` sees it; `None` when it does not exist or they may not see it.
///
/// # Errors
/// When the query fails.
pub async fn find_room(pool: &PgPool, reader: Reader, id: Uuid) -> sqlx::Result<Option<RoomView>> {
    let row = sqlx::query(&room_query("r.id = $5"))
        .bind(reader.user_id)
        .bind(reader.admin)
        .bind(reader.sees_public)
        .bind(1_i64)
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(room_from_row).transpose()
}

/// Whether room `id` exists and `reader` may see it.
///
/// # Errors
/// When the query fails.
pub async fn can_see(pool: &PgPool, reader: Reader, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM rooms r \
                        LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = $1 \
                        WHERE r.id = $4 AND {VISIBLE})"
    ))
    .bind(reader.user_id)
    .bind(reader.admin)
    .bind(reader.sees_public)
    .bind(id)
    .fetch_one(pool)
    .await
}

/// A page of room `room`'s members, owner first then by joining time, and the next cursor.
///
/// # Errors
/// When the query fails.
pub async fn members(
    pool: &PgPool,
    room: Uuid,
    after: Option<MemberCursor>,
    limit: i64,
) -> sqlx::Result<(Vec<MemberView>, Option<MemberCursor>)> {
    let mut rows: Vec<MemberView> = sqlx::query_as(
        "SELECT m.user_id, u.display_name, m.role, m.joined_at FROM room_members m \
         LEFT JOIN users u ON u.id = m.user_id \
         WHERE m.room_id = $1 \
           AND ($2::bool IS NULL OR (m.role <> 'owner', m.joined_at, m.user_id) > ($2, $3, $4)) \
         ORDER BY m.role <> 'owner', m.joined_at, m.user_id LIMIT $5",
    )
    .bind(room)
    .bind(after.map(|c| c.not_owner))
    .bind(after.map(|c| c.joined_at))
    .bind(after.map(|c| c.user_id))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        rows.last().map(|m| MemberCursor { not_owner: m.role != "owner", joined_at: m.joined_at, user_id: m.user_id })
    } else {
        None
    };
    Ok((rows, next))
}

/// Which part of a room's messages to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRange {
    /// The newest, newest first.
    Newest,
    /// Those before a position, newest first (paging back).
    Before(ConsistencyToken),
    /// Those after a position, oldest first (catching up).
    After(ConsistencyToken),
}

/// A page of room `room`'s messages (deleted ones included, with no body), and the position
/// to continue from: for [`MessageRange::After`] the last one shown when the page is full, else
/// the oldest one shown when there are older ones.
///
/// # Errors
/// When the query fails.
pub async fn messages(
    pool: &PgPool,
    room: Uuid,
    range: MessageRange,
    limit: i64,
) -> sqlx::Result<(Vec<MessageView>, Option<String>)> {
    // Three statements rather than one with optional bounds, so each is planned as the range
    // scan it is.
    let (sql, from) = match range {
        MessageRange::Newest => (
            format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = $1 ORDER BY tx DESC, pos DESC LIMIT $2"),
            None,
        ),
        MessageRange::Before(at) => (
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = $1 AND (tx, pos) < ($3, $4) \
                 ORDER BY tx DESC, pos DESC LIMIT $2"
            ),
            Some(columns(at)),
        ),
        MessageRange::After(at) => (
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = $1 AND (tx, pos) > ($3, $4) \
                 ORDER BY tx, pos LIMIT $2"
            ),
            Some(columns(at)),
        ),
    };
    let forward = matches!(range, MessageRange::After(_));
    // Paging back fetches one more to know whether there is an older page.
    let fetch = if forward { limit } else { limit + 1 };
    let mut query = sqlx::query(&sql).bind(room).bind(fetch);
    if let Some((tx, pos)) = from {
        query = query.bind(tx).bind(pos);
    }
    let rows = query.fetch_all(pool).await?;
    let mut items = rows.iter().map(MessageView::from_row).collect::<sqlx::Result<Vec<_>>>()?;
    let next = if forward {
        if items.len() as i64 == limit {
            items.last().map(|m| m.position.clone())
        } else {
            None
        }
    } else if items.len() as i64 > limit {
        items.truncate(usize::try_from(limit).unwrap_or(0));
        items.last().map(|m| m.position.clone())
    } else {
        None
    };
    Ok((items, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_cursors_round_trip_and_garbage_is_refused() {
        let c = MemberCursor {
            not_owner: true,
            joined_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap_or_default(),
            user_id: Uuid::new_v4(),
        };
        assert_eq!(MemberCursor::decode(&c.encode()), Some(c));
        assert_eq!(MemberCursor::decode("not-a-cursor"), None);
        let extra = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}|x", c.encode()));
        assert_eq!(MemberCursor::decode(&extra), None);
    }
}
