//! HTTP handlers of the rooms read models.
//!
//! Every read waits for its consistency token first (whether the caller may see a room is
//! decided on the read model, so a room just created or joined must be there), then decides: a
//! room the caller may not see is 404, exactly like one that does not exist.

use axum::extract::State;
use cairn_platform::auth::Caller;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiPath, ApiQuery, ApiResponse, Envelope, PageParams};
use cairn_platform::rooms::MessageView;
use serde::Deserialize;
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::store::{self, MemberCursor, MemberView, MessageRange, Reader, RoomView};
use crate::consistency::{ConsistencyRequest, ReadModel};
use crate::users::Cursor;
use crate::QueryState;

/// The rooms read routes.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
        .routes(routes!(list_rooms))
        .routes(routes!(get_room))
        .routes(routes!(list_members))
        .routes(routes!(list_messages))
}

fn reader(caller: &Caller) -> Reader {
    Reader { user_id: caller.id(), sees_public: caller.has("rooms:write"), admin: caller.is_admin() }
}

fn room_not_found() -> ApiError {
    ApiError::NotFound("room not found".to_owned())
}

/// `GET /api/v1/rooms` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// `true`: only the rooms the caller is a member of.
    joined: Option<bool>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor`.
    cursor: Option<String>,
}

/// The rooms the caller may read (members; public rooms for holders of `rooms:write`; every room
/// for admins), newest first, cursor-paginated, each with the caller's `unread` count and the
/// last message.
#[utoipa::path(get, path = "/api/v1/rooms", tag = "rooms", security(("bearer" = [])),
    params(ListQuery, crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "a page of rooms; meta.next_cursor", body = Envelope<Vec<RoomView>>)))]
#[tracing::instrument(skip_all)]
async fn list_rooms(
    State(pool): State<PgPool>,
    caller: Caller,
    consistency: ConsistencyRequest,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<ApiResponse<Vec<RoomView>>, ApiError> {
    let limit = PageParams { limit: query.limit, cursor: None }.limit()?;
    let after = match &query.cursor {
        Some(raw) => Some(
            Cursor::decode(raw).ok_or_else(|| ApiError::field("cursor", "is not a cursor from meta.next_cursor"))?,
        ),
        None => None,
    };
    let consistency = consistency.wait(&[ReadModel::Rooms]).await?;
    let (rooms, next) = store::list_rooms(&pool, reader(&caller), query.joined.unwrap_or(false), after, limit).await?;
    Ok(consistency.annotate(ApiResponse::ok(rooms).meta("next_cursor", next.map(|c| c.encode()))))
}

/// One room the caller may read, as the list shows it.
#[utoipa::path(get, path = "/api/v1/rooms/{id}", tag = "rooms", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id"), crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "the room", body = Envelope<RoomView>),
              (status = 404, description = "no such room, or one the caller may not see")))]
#[tracing::instrument(skip_all, fields(room = %id))]
async fn get_room(
    State(pool): State<PgPool>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<RoomView>, ApiError> {
    let consistency = consistency.wait(&[ReadModel::Rooms]).await?;
    let room = store::find_room(&pool, reader(&caller), id).await?.ok_or_else(room_not_found)?;
    Ok(consistency.annotate(ApiResponse::ok(room)))
}

/// `GET /api/v1/rooms/{id}/members` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct MembersQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor`.
    cursor: Option<String>,
}

/// A room's members, the owner first, then by joining time; cursor-paginated.
#[utoipa::path(get, path = "/api/v1/rooms/{id}/members", tag = "rooms", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id"), MembersQuery, crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "a page of members; meta.next_cursor", body = Envelope<Vec<MemberView>>),
              (status = 404, description = "no such room, or one the caller may not see")))]
#[tracing::instrument(skip_all, fields(room = %id))]
async fn list_members(
    State(pool): State<PgPool>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    consistency: ConsistencyRequest,
    ApiQuery(page): ApiQuery<MembersQuery>,
) -> Result<ApiResponse<Vec<MemberView>>, ApiError> {
    let limit = PageParams { limit: page.limit, cursor: None }.limit()?;
    let after = match &page.cursor {
        Some(raw) => Some(
            MemberCursor::decode(raw)
                .ok_or_else(|| ApiError::field("cursor", "is not a cursor from meta.next_cursor"))?,
        ),
        None => None,
    };
    // Display names come from the users read model, which a room command's token does not concern.
    let consistency = consistency.wait(&[ReadModel::Rooms]).await?;
    if !store::can_see(&pool, reader(&caller), id).await? {
        return Err(room_not_found());
    }
    let (members, next) = store::members(&pool, id, after, limit).await?;
    Ok(consistency.annotate(ApiResponse::ok(members).meta("next_cursor", next.map(|c| c.encode()))))
}

/// `GET /api/v1/rooms/{id}/messages` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct MessagesQuery {
    /// A message position (`<tx>.<pos>`): the messages before it, newest first (pass
    /// `meta.next_cursor` here to page back).
    #[param(pattern = r"^[0-9]{1,19}\.[0-9]{1,18}$")]
    before: Option<String>,
    /// A message position (`<tx>.<pos>`): the messages after it, oldest first (pass
    /// `meta.next_cursor` here to go on). Not with `before`.
    #[param(pattern = r"^[0-9]{1,19}\.[0-9]{1,18}$")]
    after: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

fn position(field: &str, raw: &str) -> Result<ConsistencyToken, ApiError> {
    raw.parse().map_err(|_| ApiError::field(field, "is not a message position ('<transaction>.<position>')"))
}

impl MessagesQuery {
    fn range(&self) -> Result<MessageRange, ApiError> {
        match (&self.before, &self.after) {
            (Some(_), Some(_)) => Err(ApiError::field("after", "cannot be combined with 'before'")),
            (Some(before), None) => Ok(MessageRange::Before(position("before", before)?)),
            (None, Some(after)) => Ok(MessageRange::After(position("after", after)?)),
            (None, None) => Ok(MessageRange::Newest),
        }
    }
}

/// A room's messages. Without `after`: newest first, `before` pages back, `meta.next_cursor` is
/// the `before` of the next page (null at the end). With `after`: the messages after that
/// position, oldest first, `meta.next_cursor` is the `after` of the next page (null when the page
/// was not full). Deleted messages are listed with `body: null` and `deleted_at`.
#[utoipa::path(get, path = "/api/v1/rooms/{id}/messages", tag = "rooms", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "room id"), MessagesQuery, crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "a page of messages; meta.next_cursor", body = Envelope<Vec<MessageView>>),
              (status = 400, description = "a bad position, or both before and after"),
              (status = 404, description = "no such room, or one the caller may not see")))]
#[tracing::instrument(skip_all, fields(room = %id))]
async fn list_messages(
    State(pool): State<PgPool>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    consistency: ConsistencyRequest,
    ApiQuery(query): ApiQuery<MessagesQuery>,
) -> Result<ApiResponse<Vec<MessageView>>, ApiError> {
    let limit = PageParams { limit: query.limit, cursor: None }.limit()?;
    let range = query.range()?;
    let consistency = consistency.wait(&[ReadModel::Rooms]).await?;
    if !store::can_see(&pool, reader(&caller), id).await? {
        return Err(room_not_found());
    }
    let (messages, next) = store::messages(&pool, id, range, limit).await?;
    Ok(consistency.annotate(ApiResponse::ok(messages).meta("next_cursor", next)))
}
