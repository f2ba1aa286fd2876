//! The command services of rooms and messages: the one path by which HTTP handlers and the
//! realtime sockets change a room or a message.
//!
//! Rules that span two aggregates (a sender must be a member of the room; a moderator is the
//! room's owner) are read from the `Room` aggregate, always current, then handed to the command
//! on the other aggregate: read-then-write, so a member removed at the very instant of a send may
//! still get that one message in. Uniqueness is never decided that way: a retried send targets
//! the same message id and the event store's primary key lets one MessageSent in.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_domain::{
    Actor, File, Message, MessageBody, MessageCommand, MessageError, MessageEvent, Room, RoomAccess, RoomCommand,
    RoomError, RoomName, RoomVisibility, Topic, User, UserStatus,
};
use cairn_platform::auth::{Caller, SessionVersions};
use cairn_platform::envelope::{from_row, ConsistencyToken, EVENT_COLUMNS};
use cairn_platform::http::limits::Limiter;
use cairn_platform::http::{ApiError, RequestContext};
use cairn_platform::rooms::{BoxFuture, MessagePort, MessageView, SendMessage, SentMessage};
use cairn_platform::settings::Settings;
use cairn_relay::RelayWakeup;
use sqlx::PgPool;
use uuid::Uuid;

use crate::executor::{Executor, Refusal};
use crate::files::attachment_problem;

/// At most this many attachments on one message.
pub const MAX_ATTACHMENTS: usize = 10;

/// The longest `client_id`.
pub const MAX_CLIENT_ID: usize = 64;

/// Messages kept in memory per process: a message is changed rarely after it is sent, and one
/// may hold 16 KiB of text, so far fewer than other aggregates.
const CACHED_MESSAGES: usize = 1_000;

/// The namespace of message ids derived from a sender's `client_id` (UUIDv5).
const CLIENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d0c_1c2a_5b7e_4f0e_9a43_2f1d_8e6b_c0a7);

/// The id of the message `author` sends to `room` with idempotency key `client_id`: UUIDv5 (SHA-1)
/// over author, room and key in a fixed namespace, so a retry, from any process, targets the
/// same aggregate.
#[must_use]
pub fn message_id_for(author: Uuid, room: Uuid, client_id: &str) -> Uuid {
    let mut name = Vec::with_capacity(48 + client_id.len());
    name.extend_from_slice(CLIENT_ID_NAMESPACE.as_bytes());
    name.extend_from_slice(author.as_bytes());
    name.extend_from_slice(room.as_bytes());
    name.extend_from_slice(client_id.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &name);
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// Whether `raw` is a valid `client_id`: 1 to 64 of `A-Z a-z 0-9 _ - . :`.
fn client_id_ok(raw: &str) -> bool {
    (1..=MAX_CLIENT_ID).contains(&raw.len())
        && raw.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

/// The caller as the room rules see it.
fn actor(caller: &Caller) -> Actor {
    Actor { id: caller.id(), admin: caller.is_admin() }
}

/// The message body, or VALIDATION_FAILED naming `body`.
fn parse_body(raw: &str) -> Result<MessageBody, ApiError> {
    MessageBody::parse(raw).map_err(|e| ApiError::field("body", e.0))
}

/// Executes room commands.
#[derive(Clone)]
pub struct RoomCommands {
    rooms: Executor<Room>,
    users: Executor<User>,
}

/// A room to create, as received.
#[derive(Debug, Clone)]
pub struct CreateRoom {
    /// Name as typed.
    pub name: String,
    /// Public or private.
    pub visibility: RoomVisibility,
    /// Topic as typed.
    pub topic: Option<String>,
}

impl RoomCommands {
    /// A service over `pool`.
    #[must_use]
    pub fn new(pool: PgPool, sessions: SessionVersions, wake: RelayWakeup) -> Self {
        Self {
            rooms: Executor::new(pool.clone(), sessions.clone(), wake.clone()),
            users: Executor::new(pool, sessions, wake),
        }
    }

    /// Loads room `id` from its events.
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn load(&self, id: Uuid) -> Result<Room, ApiError> {
        self.rooms.load(&id.to_string()).await
    }

    async fn execute(
        &self,
        id: Uuid,
        command: RoomCommand,
        caller: &Caller,
        ctx: &RequestContext,
    ) -> Result<ConsistencyToken, ApiError> {
        self.rooms.execute(&id.to_string(), command, ctx, Some(caller.id())).await
    }

    /// Creates a room owned by the caller (RoomCreated). Needs `rooms:write`.
    ///
    /// # Errors
    /// VALIDATION_FAILED naming `name` or `topic`; FORBIDDEN.
    pub async fn create(
        &self,
        caller: &Caller,
        input: CreateRoom,
        ctx: &RequestContext,
    ) -> Result<(Uuid, Room, ConsistencyToken), ApiError> {
        caller.require("rooms:write")?;
        let mut problems = BTreeMap::new();
        let name = RoomName::parse(&input.name).map_err(|e| problems.insert("name".to_owned(), e.0)).ok();
        let topic = match input.topic.as_deref().map(Topic::parse).transpose() {
            Ok(topic) => topic.flatten(),
            Err(e) => {
                problems.insert("topic".to_owned(), e.0);
                None
            }
        };
        let (Some(name), true) = (name, problems.is_empty()) else {
            return Err(ApiError::Validation { message: "room is invalid".to_owned(), details: problems });
        };
        let id = Uuid::now_v7();
        let command = RoomCommand::CreateRoom { name, topic, visibility: input.visibility, owner_id: caller.id() };
        let token = self.execute(id, command, caller, ctx).await?;
        Ok((id, self.load(id).await?, token))
    }

    /// Renames the room and/or changes its topic (RoomRenamed, RoomTopicChanged). Needs
    /// `rooms:write`, and the room's owner or an admin. `topic: Some("")` clears it.
    ///
    /// # Errors
    /// VALIDATION_FAILED; NOT_FOUND; FORBIDDEN; CONFLICT when archived or nothing changes.
    pub async fn update(
        &self,
        caller: &Caller,
        id: Uuid,
        name: Option<String>,
        topic: Option<String>,
        ctx: &RequestContext,
    ) -> Result<ConsistencyToken, ApiError> {
        caller.require("rooms:write")?;
        let mut problems = BTreeMap::new();
        let name = name.and_then(|n| RoomName::parse(&n).map_err(|e| problems.insert("name".to_owned(), e.0)).ok());
        let topic = topic.and_then(|t| Topic::parse(&t).map_err(|e| problems.insert("topic".to_owned(), e.0)).ok());
        if !problems.is_empty() {
            return Err(ApiError::Validation { message: "room change is invalid".to_owned(), details: problems });
        }
        self.execute(id, RoomCommand::UpdateRoom { name, topic, actor: actor(caller) }, caller, ctx).await
    }

    /// Archives the room (RoomArchived). Needs `rooms:write`, and the owner or an admin.
    ///
    /// # Errors
    /// NOT_FOUND; FORBIDDEN; CONFLICT when archived already.
    pub async fn archive(&self, caller: &Caller, id: Uuid, ctx: &RequestContext) -> Result<ConsistencyToken, ApiError> {
        caller.require("rooms:write")?;
        self.execute(id, RoomCommand::ArchiveRoom { actor: actor(caller) }, caller, ctx).await
    }

    /// Joins a public room (MemberJoined). Needs `rooms:write`.
    ///
    /// # Errors
    /// NOT_FOUND (private rooms included); CONFLICT when a member already or archived.
    pub async fn join(&self, caller: &Caller, id: Uuid, ctx: &RequestContext) -> Result<ConsistencyToken, ApiError> {
        caller.require("rooms:write")?;
        self.execute(id, RoomCommand::JoinRoom { user_id: caller.id() }, caller, ctx).await
    }

    /// Leaves a room (MemberLeft). Needs `rooms:write`.
    ///
    /// # Errors
    /// NOT_FOUND; CONFLICT when not a member, the owner, or archived.
    pub async fn leave(&self, caller: &Caller, id: Uuid, ctx: &RequestContext) -> Result<ConsistencyToken, ApiError> {
        caller.require("rooms:write")?;
        self.execute(id, RoomCommand::LeaveRoom { user_id: caller.id() }, caller, ctx).await
    }

    /// Adds an active user to the room (MemberInvited). Needs `rooms:write`, and the owner or an admin.
    ///
    /// # Errors
    /// NOT_FOUND (the room, or the user: `details.user_id`); FORBIDDEN; CONFLICT.
    pub async fn invite(
        &self,
        caller: &Caller,
        id: Uuid,
        user_id: Uuid,
        ctx: &RequestContext,
    ) -> Result<ConsistencyToken, ApiError> {
        caller.require("rooms:write")?;
        let actor = actor(caller);
        // Who may not moderate the room learns nothing about the user.
        let room = self.load(id).await?;
        if !room.visible_to(actor.id, actor.admin) {
            return Err(RoomError::NotFound.to_api());
        }
        if !room.moderated_by(actor) {
            return Err(RoomError::NotOwner.to_api());
        }
        let user = self.users.load(&user_id.to_string()).await?;
        if user.status != UserStatus::Active {
            return Err(ApiError::NotFound(format!("user {user_id} not found")));
        }
        self.execute(id, RoomCommand::InviteMember { actor, user_id }, caller, ctx).await
    }

    /// Removes a member other than the owner (MemberRemoved). Needs `rooms:write`, and the owner or an admin.
    ///
    /// # Errors
    /// NOT_FOUND; FORBIDDEN; CONFLICT when not a member, the owner, or archived.
    pub async fn remove(
        &self,
        caller: &Caller,
        id: Uuid,
        user_id: Uuid,
        ctx: &RequestContext,
    ) -> Result<ConsistencyToken, ApiError> {
        caller.require("rooms:write")?;
        self.execute(id, RoomCommand::RemoveMember { actor: actor(caller), user_id }, caller, ctx).await
    }

    /// Moves the caller's read marker in room `id` forward to message `message_id` (never back).
    /// Any member may, whatever their permissions (a `readonly` member too); the marker is the
    /// caller's own reading state, written directly, never in the log.
    ///
    /// # Errors
    /// NOT_FOUND (room or message of that room); FORBIDDEN for a non-member of a public room.
    pub async fn mark_read(&self, caller: &Caller, id: Uuid, message_id: Uuid) -> Result<ConsistencyToken, ApiError> {
        let room = self.load(id).await?;
        let actor = actor(caller);
        if !room.visible_to(actor.id, actor.admin) {
            return Err(RoomError::NotFound.to_api());
        }
        if !room.is_member(actor.id) {
            return Err(ApiError::Forbidden("join the room first".to_owned()));
        }
        let pool = self.rooms.pool();
        let sent = sent_event(pool, message_id).await?.filter(|(room_id, _)| *room_id == id);
        let Some((_, position)) = sent else {
            return Err(ApiError::NotFound(format!("message {message_id} not found in this room")));
        };
        let (tx, pos) = cairn_platform::rooms::columns(position);
        sqlx::query(
            "INSERT INTO room_read_markers (user_id, room_id, message_id, tx, pos, updated_at) \
             VALUES ($1, $2, $3, $4, $5, now()) \
             ON CONFLICT (user_id, room_id) DO UPDATE \
               SET message_id = EXCLUDED.message_id, tx = EXCLUDED.tx, pos = EXCLUDED.pos, updated_at = now() \
             WHERE (room_read_markers.tx, room_read_markers.pos) < (EXCLUDED.tx, EXCLUDED.pos)",
        )
        .bind(actor.id)
        .bind(id)
        .bind(message_id)
        .bind(tx)
        .bind(pos)
        .execute(pool)
        .await?;
        Ok(position)
    }
}

/// The room and position of message `id`'s MessageSent event, read from the log.
async fn sent_event(pool: &PgPool, id: Uuid) -> Result<Option<(Uuid, ConsistencyToken)>, ApiError> {
    let row = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_type = 'Message' AND aggregate_id = $1 AND sequence = 1"
    ))
    .bind(id.to_string())
    .fetch_optional(pool)
    .await?;
    let Some(event) = row.as_ref().map(from_row).transpose()? else { return Ok(None) };
    let room = event.body().get("room_id").and_then(|v| v.as_str()).and_then(|s| s.parse().ok());
    Ok(room.map(|room| (room, event.position())))
}

/// Message `id` as readers will see it, folded from its events in the log (never from the read
/// model, which may lag): position and `created_at` are those of its MessageSent event.
///
/// # Errors
/// When Postgres fails or a stored event cannot be read.
pub async fn message_view(pool: &PgPool, id: Uuid) -> Result<Option<MessageView>, ApiError> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_type = 'Message' AND aggregate_id = $1 ORDER BY sequence"
    ))
    .bind(id.to_string())
    .fetch_all(pool)
    .await?;
    let mut view: Option<MessageView> = None;
    for row in &rows {
        let event = from_row(row)?;
        let payload: MessageEvent = serde_json::from_value(event.payload.clone())
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("message {id}: unreadable event: {e}")))?;
        match payload {
            MessageEvent::MessageSent { .. } => view = MessageView::from_sent(&event),
            MessageEvent::MessageEdited { body, .. } => {
                if let Some(view) = view.as_mut() {
                    view.body = Some(body);
                    view.edited_at = Some(event.recorded_at);
                }
            }
            MessageEvent::MessageDeleted { .. } => {
                if let Some(view) = view.as_mut() {
                    view.body = None;
                    view.deleted_at = Some(event.recorded_at);
                }
            }
        }
    }
    Ok(view)
}

/// Executes message commands: sends (HTTP and sockets alike), edits and deletions. Constructible
/// on its own, so a process serving only reads and sockets can take sends too.
#[derive(Clone)]
pub struct MessageCommands {
    messages: Executor<Message>,
    rooms: Executor<Room>,
    /// Files, for the attachments' check.
    files: Executor<File>,
    /// Sends per user (`CAIRN_RATE_LIMIT_MESSAGES`; none when `off`).
    limiter: Option<Arc<Limiter<Uuid>>>,
}

impl MessageCommands {
    /// A service over `pool`, limited by `settings.rate_limit_messages`.
    #[must_use]
    pub fn new(pool: PgPool, sessions: SessionVersions, wake: RelayWakeup, settings: &Settings) -> Self {
        Self {
            messages: Executor::with_cache(pool.clone(), sessions.clone(), wake.clone(), CACHED_MESSAGES),
            rooms: Executor::new(pool.clone(), sessions.clone(), wake.clone()),
            files: Executor::new(pool, sessions, wake),
            limiter: settings
                .rate_limit_messages
                .and_then(|rate| Limiter::swept("messages", rate, settings.rate_limit_sweep)),
        }
    }

    fn pool(&self) -> &PgPool {
        self.messages.pool()
    }

    /// Sends a message as `caller` (MessageSent). Needs `messages:write` and membership of the
    /// room. A `client_id` sent again (by a retry, from any process, at the same instant or after
    /// a crash) answers with the first message and `created: false`.
    ///
    /// # Errors
    /// VALIDATION_FAILED naming `body`, `client_id` or `attachments`; FORBIDDEN (lacking the
    /// permission, or not joined to a public room); NOT_FOUND (no room, or private and not a
    /// member); CONFLICT (archived); RATE_LIMITED.
    pub async fn send(
        &self,
        caller: &Caller,
        input: SendMessage,
        ctx: &RequestContext,
    ) -> Result<SentMessage, ApiError> {
        caller.require("messages:write")?;
        let mut problems = BTreeMap::new();
        let body = MessageBody::parse(&input.body).map_err(|e| problems.insert("body".to_owned(), e.0)).ok();
        if let Some(client_id) = &input.client_id {
            if !client_id_ok(client_id) {
                problems.insert(
                    "client_id".to_owned(),
                    "client_id must be 1-64 characters of A-Z, a-z, 0-9, '_', '-', '.' or ':'".to_owned(),
                );
            }
        }
        if input.attachments.len() > MAX_ATTACHMENTS {
            problems.insert("attachments".to_owned(), format!("at most {MAX_ATTACHMENTS} attachments"));
        }
        let (Some(body), true) = (body, problems.is_empty()) else {
            return Err(ApiError::Validation { message: "message is invalid".to_owned(), details: problems });
        };
        let author = caller.id();
        let id = match &input.client_id {
            Some(client_id) => message_id_for(author, input.room_id, client_id),
            None => Uuid::now_v7(),
        };
        if let Some(limiter) = &self.limiter {
            if let Err(limited) = limiter.check(&author) {
                // A retry of a message already sent is answered with it, limit or not: the
                // client is told what it needs to stop retrying, and nothing is appended.
                if input.client_id.is_some() {
                    if let Some(message) = message_view(self.pool(), id).await? {
                        let token = message.position.parse().unwrap_or_default();
                        return Ok(SentMessage { message, created: false, token });
                    }
                }
                return Err(limited);
            }
        }
        let room = self.rooms.load(&input.room_id.to_string()).await?;
        let access = if !room.created {
            RoomAccess::Missing
        } else if !room.is_member(author) {
            RoomAccess::NotMember { private: room.visibility == RoomVisibility::Private }
        } else if room.archived {
            RoomAccess::Archived
        } else {
            RoomAccess::Member
        };
        // Each attachment must be a live file of the sender's, read from its aggregate (always
        // current). A retry of a message sent before is answered with it, even if a file it
        // carried has been deleted since.
        // Only a member's send gets that far: anyone else is refused by the room's rules first.
        let checked = if matches!(access, RoomAccess::Member) {
            attachment_problem(&self.files, author, &input.attachments).await?
        } else {
            None
        };
        if let Some(problem) = checked {
            if input.client_id.is_some() {
                if let Some(message) = message_view(self.pool(), id).await? {
                    let token = message.position.parse().unwrap_or_default();
                    return Ok(SentMessage { message, created: false, token });
                }
            }
            return Err(ApiError::field("attachments", problem));
        }
        let command = MessageCommand::SendMessage {
            room_id: input.room_id,
            author_id: author,
            body,
            client_id: input.client_id.clone(),
            attachments: input.attachments,
            room: access,
        };
        match self.messages.execute(&id.to_string(), command, ctx, Some(author)).await {
            Ok(token) => {
                let message = self.view(id).await?;
                Ok(SentMessage { message, created: true, token })
            }
            // Sent already (a retry), or lost the race for the same id to a concurrent send: the
            // event store let exactly one MessageSent in, and that one is the answer.
            Err(ApiError::Conflict(reason)) if input.client_id.is_some() => {
                match message_view(self.pool(), id).await? {
                    Some(message) => {
                        let token = message.position.parse().unwrap_or_default();
                        Ok(SentMessage { message, created: false, token })
                    }
                    None => Err(ApiError::Conflict(reason)),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn view(&self, id: Uuid) -> Result<MessageView, ApiError> {
        message_view(self.pool(), id)
            .await?
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("message {id} committed but not in the log")))
    }

    /// The message and its room, when the caller may see that room (else NOT_FOUND).
    async fn visible(&self, caller: &Caller, id: Uuid) -> Result<(Message, Room), ApiError> {
        let message = self.messages.load(&id.to_string()).await?;
        let not_found = || MessageError::NotFound.to_api();
        if !message.sent {
            return Err(not_found());
        }
        let room = self.rooms.load(&message.room_id.to_string()).await?;
        let actor = actor(caller);
        if !room.visible_to(actor.id, actor.admin) {
            return Err(not_found());
        }
        Ok((message, room))
    }

    /// Changes a message's text (MessageEdited). Needs `messages:write`; the author only.
    ///
    /// # Errors
    /// VALIDATION_FAILED naming `body`; NOT_FOUND (also once deleted); FORBIDDEN; CONFLICT
    /// (archived room, or the same text).
    pub async fn edit(
        &self,
        caller: &Caller,
        id: Uuid,
        body: &str,
        ctx: &RequestContext,
    ) -> Result<(MessageView, ConsistencyToken), ApiError> {
        caller.require("messages:write")?;
        let body = parse_body(body)?;
        let (_, room) = self.visible(caller, id).await?;
        let command = MessageCommand::EditMessage { actor: caller.id(), body, room_archived: room.archived };
        let token = self.messages.execute(&id.to_string(), command, ctx, Some(caller.id())).await?;
        Ok((self.view(id).await?, token))
    }

    /// Deletes a message (MessageDeleted). Needs `messages:write`; the author, the room's owner
    /// or an admin.
    ///
    /// # Errors
    /// NOT_FOUND (also once deleted); FORBIDDEN.
    pub async fn delete(&self, caller: &Caller, id: Uuid, ctx: &RequestContext) -> Result<ConsistencyToken, ApiError> {
        caller.require("messages:write")?;
        let (_, room) = self.visible(caller, id).await?;
        let command = MessageCommand::DeleteMessage { actor: caller.id(), moderator: room.moderated_by(actor(caller)) };
        self.messages.execute(&id.to_string(), command, ctx, Some(caller.id())).await
    }
}

impl MessagePort for MessageCommands {
    fn send<'a>(
        &'a self,
        caller: &'a Caller,
        message: SendMessage,
        ctx: &'a RequestContext,
    ) -> BoxFuture<'a, Result<SentMessage, ApiError>> {
        Box::pin(MessageCommands::send(self, caller, message, ctx))
    }
}

impl Refusal for RoomError {
    fn to_api(&self) -> ApiError {
        match self {
            Self::NotFound => ApiError::NotFound(self.to_string()),
            Self::NotOwner => ApiError::Forbidden(self.to_string()),
            Self::AlreadyCreated
            | Self::Archived
            | Self::AlreadyMember
            | Self::NotMember
            | Self::OwnerStays
            | Self::Unchanged => ApiError::Conflict(self.to_string()),
        }
    }
}

impl Refusal for MessageError {
    fn to_api(&self) -> ApiError {
        match self {
            Self::NotFound | Self::RoomNotFound | Self::Deleted => ApiError::NotFound(self.to_string()),
            Self::NotAuthor | Self::NotMember => ApiError::Forbidden(self.to_string()),
            Self::AlreadySent | Self::RoomArchived | Self::Unchanged => ApiError::Conflict(self.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_version_5_and_depend_on_author_room_and_key() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let id = message_id_for(a, b, "c-1");
        assert_eq!(id.get_version_num(), 5);
        assert_eq!(id, message_id_for(a, b, "c-1"));
        assert_ne!(id, message_id_for(b, a, "c-1"));
        assert_ne!(id, message_id_for(a, b, "c-2"));
    }

    #[test]
    fn client_ids_are_short_and_plain() {
        assert!(client_id_ok("a.B-1_x:9"));
        assert!(client_id_ok(&"x".repeat(64)));
        assert!(!client_id_ok(&"x".repeat(65)));
        assert!(!client_id_ok(""));
        assert!(!client_id_ok("a b"));
        assert!(!client_id_ok("é"));
    }
}
