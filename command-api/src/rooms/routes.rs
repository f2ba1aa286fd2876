//! HTTP handlers of the room and message commands. Each parses its input and hands it to
//! [`RoomCommands`] or [`MessageCommands`], which check permissions and membership; none holds
//! business rules.

use axum::extract::State;
use axum::http::StatusCode;
use cairn_domain::RoomVisibility;
use cairn_platform::auth::Caller;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiJson, ApiPath, ApiResponse, Envelope, RequestContext};
use cairn_platform::rooms::SendMessage;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{CreateRoom, MessageCommands, RoomCommands};
use crate::answers::{MessageData, MessageIdData, ReadMarkerData, RoomData, RoomIdData, RoomMemberData};
use crate::CommandState;

/// The room and message command routes.
pub fn routes() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(create_room))
        .routes(routes!(update_room, archive_room))
        .routes(routes!(join_room))
        .routes(routes!(leave_room))
        .routes(routes!(invite_member))
        .routes(routes!(remove_member))
        .routes(routes!(send_message))
        .routes(routes!(edit_message, delete_message))
        .routes(routes!(mark_read))
}

/// An accepted command: the answer's `meta.consistency_token` lets a read wait for it.
fn accepted<T: Serialize>(status: StatusCode, data: T, token: ConsistencyToken) -> ApiResponse<T> {
    ApiResponse::with_status(status, data).consistency(token)
}

/// `POST /api/v1/rooms` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoomBody {
    /// 1 to 100 characters after trimming, no control characters.
    #[schema(min_length = 1, max_length = 100)]
    name: String,
    /// `public` (anyone signed in may see and join it) or `private` (members only, by invitation).
    #[schema(pattern = "^(public|private)$")]
    visibility: String,
    /// Up to 500 characters; blank means none.
    #[schema(max_length = 500)]
    topic: Option<String>,
}

/// `PATCH /api/v1/rooms/{id}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRoomBody {
    /// New name: 1 to 100 characters after trimming.
    #[schema(min_length = 1, max_length = 100)]
    name: Option<String>,
    /// New topic, up to 500 characters; an empty string clears it.
    #[schema(max_length = 500)]
    topic: Option<String>,
}

/// `POST /api/v1/rooms/{id}/members` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteBody {
    /// An active user.
    user_id: Uuid,
}

/// `POST /api/v1/rooms/{id}/messages` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessageBody {
    /// 1 to 4,000 characters after trimming; no control characters but newline and tab. Stored
    /// and returned as text, never interpreted as HTML.
    #[schema(min_length = 1, max_length = 4000)]
    body: String,
    /// Idempotency key: sending again with the same one returns the first message (200).
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,64}$")]
    client_id: Option<String>,
    /// Ids of attached files (at most 10).
    #[schema(max_items = 10)]
    attachments: Option<Vec<Uuid>>,
}

/// `PATCH /api/v1/messages/{id}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditMessageBody {
    /// The new text (as for sending).
    #[schema(min_length = 1, max_length = 4000)]
    body: String,
}

/// `POST /api/v1/rooms/{id}/read` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkReadBody {
    /// A message of the room, read up to and including.
    message_id: Uuid,
}

fn parse_visibility(raw: &str) -> Result<RoomVisibility, ApiError> {
    match raw {
        "public" => Ok(RoomVisibility::Public),
        "private" => Ok(RoomVisibility::Private),
        _ => Err(ApiError::field("visibility", "visibility must be 'public' or 'private'")),
    }
}

/// Creates a room (RoomCreated); the caller owns it and is its first member. Needs `rooms:write`.
#[utoipa::path(post, path = "/api/v1/rooms", tag = "rooms", request_body = CreateRoomBody, security(("bearer" = [])),
    responses((status = 201, description = "created", body = Envelope<RoomData>),
              (status = 400, description = "bad name, topic or visibility"), (status = 403, description = "lacks rooms:write")))]
async fn create_room(
    State(rooms): State<RoomCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiJson(body): ApiJson<CreateRoomBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("rooms:write")?;
    let visibility = parse_visibility(&body.visibility)?;
    let input = CreateRoom { name: body.name, visibility, topic: body.topic };
    let (id, room, token) = rooms.create(&caller, input, &ctx).await?;
    let data = json!({
        "id": id, "name": room.name, "topic": room.topic, "visibility": room.visibility.as_str(),
        "owner_id": room.owner_id, "archived": room.archived,
    });
    Ok(accepted(StatusCode::CREATED, data, token))
}

/// Renames a room or changes its topic (RoomRenamed, RoomTopicChanged). Needs `rooms:write`; the
/// room's owner or an admin.
#[utoipa::path(patch, path = "/api/v1/rooms/{id}", tag = "rooms", request_body = UpdateRoomBody, security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id")),
    responses((status = 200, description = "changed", body = Envelope<RoomIdData>), (status = 400, description = "bad name or topic"),
              (status = 403, description = "not the owner or an admin"), (status = 404, description = "no such room (or private)"),
              (status = 409, description = "archived, or nothing changes")))]
async fn update_room(
    State(rooms): State<RoomCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateRoomBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = rooms.update(&caller, id, body.name, body.topic, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "id": id }), token))
}

/// Archives a room (RoomArchived): read-only from then on. Needs `rooms:write`; the owner or an admin.
#[utoipa::path(delete, path = "/api/v1/rooms/{id}", tag = "rooms", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id")),
    responses((status = 200, description = "archived", body = Envelope<RoomIdData>),
              (status = 403, description = "not the owner or an admin"), (status = 404, description = "no such room (or private)"),
              (status = 409, description = "archived already")))]
async fn archive_room(
    State(rooms): State<RoomCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = rooms.archive(&caller, id, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "id": id }), token))
}

/// Joins a public room (MemberJoined). Needs `rooms:write`. Private rooms are joined by invitation only (404).
#[utoipa::path(post, path = "/api/v1/rooms/{id}/join", tag = "rooms", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id")),
    responses((status = 200, description = "joined", body = Envelope<RoomMemberData>), (status = 403, description = "lacks rooms:write"),
              (status = 404, description = "no such room, or private"), (status = 409, description = "a member already, or archived")))]
async fn join_room(
    State(rooms): State<RoomCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = rooms.join(&caller, id, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "room_id": id, "user_id": caller.id() }), token))
}

/// Leaves a room (MemberLeft). Needs `rooms:write`. The owner cannot leave (archive instead).
#[utoipa::path(post, path = "/api/v1/rooms/{id}/leave", tag = "rooms", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id")),
    responses((status = 200, description = "left", body = Envelope<RoomMemberData>), (status = 403, description = "lacks rooms:write"),
              (status = 404, description = "no such room (or private and not a member)"),
              (status = 409, description = "not a member, the owner, or archived")))]
async fn leave_room(
    State(rooms): State<RoomCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = rooms.leave(&caller, id, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "room_id": id, "user_id": caller.id() }), token))
}

/// Adds an active user to a room (MemberInvited): the way into a private room. Needs
/// `rooms:write`; the room's owner or an admin.
#[utoipa::path(post, path = "/api/v1/rooms/{id}/members", tag = "rooms", request_body = InviteBody, security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id")),
    responses((status = 200, description = "added", body = Envelope<RoomMemberData>),
              (status = 403, description = "not the owner or an admin"), (status = 404, description = "no such room or user"),
              (status = 409, description = "a member already, or archived")))]
async fn invite_member(
    State(rooms): State<RoomCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<InviteBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = rooms.invite(&caller, id, body.user_id, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "room_id": id, "user_id": body.user_id }), token))
}

/// Removes a member other than the owner (MemberRemoved). Needs `rooms:write`; the owner or an admin.
#[utoipa::path(delete, path = "/api/v1/rooms/{id}/members/{user_id}", tag = "rooms", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id"), ("user_id" = Uuid, Path, description = "member")),
    responses((status = 200, description = "removed", body = Envelope<RoomMemberData>),
              (status = 403, description = "not the owner or an admin"), (status = 404, description = "no such room (or private)"),
              (status = 409, description = "not a member, the owner, or archived")))]
async fn remove_member(
    State(rooms): State<RoomCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath((id, user_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = rooms.remove(&caller, id, user_id, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "room_id": id, "user_id": user_id }), token))
}

/// Sends a message (MessageSent). Needs `messages:write` and membership. The same `client_id`
/// again returns the first message with 200, never a second one.
#[utoipa::path(post, path = "/api/v1/rooms/{id}/messages", tag = "messages", request_body = SendMessageBody, security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id")),
    responses((status = 201, description = "sent", body = Envelope<MessageData>),
              (status = 200, description = "sent before with this client_id: the first message", body = Envelope<MessageData>),
              (status = 400, description = "bad body, client_id or attachments"),
              (status = 403, description = "lacks messages:write, or not joined to this public room"),
              (status = 404, description = "no such room (or private)"), (status = 409, description = "archived"),
              (status = 429, description = "too many messages; Retry-After")))]
async fn send_message(
    State(messages): State<MessageCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<SendMessageBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let input = SendMessage {
        room_id: id,
        body: body.body,
        client_id: body.client_id,
        attachments: body.attachments.unwrap_or_default(),
    };
    let sent = messages.send(&caller, input, &ctx).await?;
    let status = if sent.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(accepted(status, json!({ "message": sent.message }), sent.token))
}

/// Changes a message's text (MessageEdited). Needs `messages:write`; the author only.
#[utoipa::path(patch, path = "/api/v1/messages/{id}", tag = "messages", request_body = EditMessageBody, security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "message id")),
    responses((status = 200, description = "edited", body = Envelope<MessageData>), (status = 400, description = "bad body"),
              (status = 403, description = "not the author"), (status = 404, description = "no such message, or deleted"),
              (status = 409, description = "archived room, or the same text")))]
async fn edit_message(
    State(messages): State<MessageCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<EditMessageBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let (message, token) = messages.edit(&caller, id, &body.body, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "message": message }), token))
}

/// Deletes a message (MessageDeleted): its text leaves the reads, the events stay. Needs
/// `messages:write`; the author, the room's owner or an admin.
#[utoipa::path(delete, path = "/api/v1/messages/{id}", tag = "messages", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "message id")),
    responses((status = 200, description = "deleted", body = Envelope<MessageIdData>),
              (status = 403, description = "not the author, the room's owner or an admin"),
              (status = 404, description = "no such message, or deleted")))]
async fn delete_message(
    State(messages): State<MessageCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = messages.delete(&caller, id, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "id": id }), token))
}

/// Moves the caller's read marker forward to a message of the room (never back); unread counts
/// follow. Any member may, `readonly` members too. `meta.consistency_token` is the message's position.
#[utoipa::path(post, path = "/api/v1/rooms/{id}/read", tag = "rooms", request_body = MarkReadBody, security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id")),
    responses((status = 200, description = "marked", body = Envelope<ReadMarkerData>),
              (status = 403, description = "not a member of this public room"),
              (status = 404, description = "no such room (or private), or no such message in it")))]
async fn mark_read(
    State(rooms): State<RoomCommands>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<MarkReadBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let position = rooms.mark_read(&caller, id, body.message_id).await?;
    let data = json!({ "room_id": id, "message_id": body.message_id, "position": position.to_string() });
    Ok(accepted(StatusCode::OK, data, position))
}
