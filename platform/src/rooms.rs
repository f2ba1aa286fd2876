//! What the read side, the realtime sockets and the command side share about chat messages: the
//! one JSON shape a message has everywhere (HTTP reads, command answers, socket frames), and the
//! port through which a socket sends a message on the command path.

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Caller;
use crate::envelope::{ConsistencyToken, EventEnvelope};
use crate::http::{ApiError, RequestContext};

/// A message as every reader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageView {
    /// The message's id.
    pub id: Uuid,
    /// Its room.
    pub room_id: Uuid,
    /// Who sent it.
    pub author_id: Uuid,
    /// The text, as sent (never interpreted as HTML); `null` once deleted.
    pub body: Option<String>,
    /// The sender's idempotency key, when it gave one.
    pub client_id: Option<String>,
    /// Attached file ids.
    pub attachments: Vec<Uuid>,
    /// Its place in the log's order, `<transaction>.<position>`: what `after=` and a socket's
    /// `join.after` take to resume after it.
    #[schema(value_type = String, example = "7421.1093")]
    pub position: String,
    /// When it was sent.
    pub created_at: DateTime<Utc>,
    /// When it was last edited.
    pub edited_at: Option<DateTime<Utc>>,
    /// When it was deleted.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// The columns of `messages` that [`MessageView::from_row`] reads, in a `SELECT`.
pub const MESSAGE_COLUMNS: &str =
    "id, room_id, author_id, body, client_id, attachments, tx, pos, created_at, edited_at, deleted_at";

impl MessageView {
    /// Reads one row selected with [`MESSAGE_COLUMNS`].
    ///
    /// # Errors
    /// When a column is missing or of another type.
    pub fn from_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<Self> {
        use sqlx::Row;
        let tx: i64 = row.try_get("tx")?;
        let pos: i64 = row.try_get("pos")?;
        Ok(Self {
            id: row.try_get("id")?,
            room_id: row.try_get("room_id")?,
            author_id: row.try_get("author_id")?,
            body: row.try_get("body")?,
            client_id: row.try_get("client_id")?,
            attachments: row.try_get("attachments")?,
            position: position(tx, pos).to_string(),
            created_at: row.try_get("created_at")?,
            edited_at: row.try_get("edited_at")?,
            deleted_at: row.try_get("deleted_at")?,
        })
    }
}

impl MessageView {
    /// A message as its `MessageSent` event states it (not edited, not deleted): what the command
    /// side answers and what sockets receive before the read model has it. `None` when `event` is
    /// not a readable `MessageSent`.
    #[must_use]
    pub fn from_sent(event: &EventEnvelope) -> Option<Self> {
        #[derive(Deserialize)]
        struct Sent {
            room_id: Uuid,
            author_id: Uuid,
            body: String,
            client_id: Option<String>,
            #[serde(default)]
            attachments: Vec<Uuid>,
        }
        if event.event_type != "MessageSent" {
            return None;
        }
        let sent = Sent::deserialize(event.body()).ok()?;
        Some(Self {
            id: event.aggregate_id.parse().ok()?,
            room_id: sent.room_id,
            author_id: sent.author_id,
            body: Some(sent.body),
            client_id: sent.client_id,
            attachments: sent.attachments,
            position: event.position().to_string(),
            created_at: event.recorded_at,
            edited_at: None,
            deleted_at: None,
        })
    }
}

/// The token of a `messages` row's `(tx, pos)` columns (stored as `bigint`).
#[must_use]
pub fn position(tx: i64, pos: i64) -> ConsistencyToken {
    ConsistencyToken { tx: u64::try_from(tx).unwrap_or(0), pos }
}

/// `(tx, pos)` as the `bigint` columns store them.
#[must_use]
pub fn columns(token: ConsistencyToken) -> (i64, i64) {
    (i64::try_from(token.tx).unwrap_or(i64::MAX), token.pos)
}

/// A message send as the command side answers it.
#[derive(Debug, Clone)]
pub struct SentMessage {
    /// The message (the first one, when the `client_id` had been used already).
    pub message: MessageView,
    /// False when this was a retry answered with the message sent before.
    pub created: bool,
    /// The consistency token of the send.
    pub token: ConsistencyToken,
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct SendMessage {
    /// The room.
    pub room_id: Uuid,
    /// The text as typed (validated by the command side).
    pub body: String,
    /// The sender's idempotency key.
    pub client_id: Option<String>,
    /// Attached file ids.
    pub attachments: Vec<Uuid>,
}

/// A boxed future, for the object-safe [`MessagePort`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The command path a socket's `send` frame takes: the same checks, rate limit and idempotency
/// as `POST /api/v1/rooms/{id}/messages`. Implemented by the command side; the realtime sockets
/// hold it as `Arc<dyn MessagePort>`.
pub trait MessagePort: Send + Sync {
    /// Sends `message` as `caller` (whose token was verified and whose session is current).
    fn send<'a>(
        &'a self,
        caller: &'a Caller,
        message: SendMessage,
        ctx: &'a RequestContext,
    ) -> BoxFuture<'a, Result<SentMessage, ApiError>>;
}
