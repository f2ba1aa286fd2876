//! HTTP handlers of the users read model.

use axum::extract::State;
use cairn_platform::auth::Caller;
use cairn_platform::http::{ApiError, ApiPath, ApiQuery, ApiResponse, Page};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::store::{self, Cursor, UserFilter, UserRow};
use crate::consistency::{ConsistencyRequest, ReadModel};
use crate::QueryState;

/// The users read routes.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(list_users))
        .routes(routes!(get_user))
        .routes(routes!(list_roles))
        .routes(routes!(my_sessions))
}

/// The caller's profile, roles, permissions and verified flag.
#[utoipa::path(get, path = "/api/v1/users/me", tag = "users", security(("bearer" = [])),
    params(("X-Consistency-Token" = Option<String>, Header, description = "wait until this command is visible")),
    responses((status = 200, description = "profile"), (status = 401, description = "not signed in"),
              (status = 404, description = "not in the read model yet")))]
async fn me(
    State(pool): State<PgPool>,
    caller: Caller,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let consistency = consistency.wait(&[ReadModel::Users]).await?;
    let user = store::find(&pool, caller.id()).await?.ok_or_else(|| ApiError::NotFound("user not found".to_owned()))?;
    let mut view = serde_json::to_value(&user).map_err(anyhow::Error::from)?;
    view["permissions"] = json!(caller.claims.perms);
    Ok(consistency.annotate(ApiResponse::ok(view)))
}

/// `GET /api/v1/users` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Substring of email or display name.
    q: Option<String>,
    /// Holds this role.
    role: Option<String>,
    /// `active`, `deactivated` or `deleted` (deleted users are listed only when asked for).
    status: Option<String>,
    /// Page size, 1 to 100 (default 20).
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor`.
    cursor: Option<String>,
}

/// Users, newest first, cursor-paginated. Needs `users:read`.
#[utoipa::path(get, path = "/api/v1/users", tag = "users", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, description = "a page of users; meta.next_cursor"), (status = 401, description = "not signed in"),
              (status = 403, description = "lacks users:read")))]
async fn list_users(
    State(pool): State<PgPool>,
    caller: Caller,
    consistency: ConsistencyRequest,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<ApiResponse<Vec<UserRow>>, ApiError> {
    caller.require("users:read")?;
    let limit = cairn_platform::http::PageParams { limit: query.limit, cursor: None }.limit()?;
    if let Some(status) = &query.status {
        if !["active", "deactivated", "deleted"].contains(&status.as_str()) {
            return Err(ApiError::field("status", "must be one of active, deactivated, deleted"));
        }
    }
    if query.q.as_ref().is_some_and(|q| q.chars().count() > 200) {
        return Err(ApiError::field("q", "must be at most 200 characters"));
    }
    let after = match &query.cursor {
        Some(raw) => Some(
            Cursor::decode(raw).ok_or_else(|| ApiError::field("cursor", "is not a cursor from meta.next_cursor"))?,
        ),
        None => None,
    };
    let consistency = consistency.wait(&[ReadModel::Users]).await?;
    let filter = UserFilter { q: query.q.filter(|q| !q.is_empty()), role: query.role, status: query.status };
    let (items, next) = store::list(&pool, &filter, after, limit).await?;
    let page = Page { items, next_cursor: next.map(|c| c.encode()) };
    Ok(consistency.annotate(ApiResponse::ok(page.items).meta("next_cursor", page.next_cursor)))
}

/// One user. Needs `users:read`, except for oneself.
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id"),
           ("X-Consistency-Token" = Option<String>, Header, description = "wait until this command is visible")),
    responses((status = 200, description = "the user"), (status = 401, description = "not signed in"),
              (status = 403, description = "lacks users:read"), (status = 404, description = "no such user")))]
async fn get_user(
    State(pool): State<PgPool>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<UserRow>, ApiError> {
    caller.require_self_or(id, "users:read")?;
    let consistency = consistency.wait(&[ReadModel::Users]).await?;
    let user = store::find(&pool, id).await?.ok_or_else(|| ApiError::NotFound("user not found".to_owned()))?;
    Ok(consistency.annotate(ApiResponse::ok(user)))
}

/// The roles and the permissions each grants. Any signed-in caller.
#[utoipa::path(get, path = "/api/v1/roles", tag = "roles", security(("bearer" = [])),
    params(("X-Consistency-Token" = Option<String>, Header, description = "wait until this command is visible")),
    responses((status = 200, description = "roles"), (status = 401, description = "not signed in")))]
async fn list_roles(
    State(pool): State<PgPool>,
    _caller: Caller,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let consistency = consistency.wait(&[ReadModel::Roles]).await?;
    let roles: Vec<(String, Vec<String>)> =
        sqlx::query_as("SELECT name, permissions FROM roles ORDER BY name").fetch_all(&pool).await?;
    let roles: Vec<serde_json::Value> =
        roles.into_iter().map(|(name, perms)| json!({ "name": name, "permissions": perms })).collect();
    Ok(consistency.annotate(ApiResponse::ok(json!(roles))))
}

/// A session in the caller's list.
#[derive(Debug, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
struct SessionRow {
    id: Uuid,
    device: Option<String>,
    ip: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    last_used_at: chrono::DateTime<chrono::Utc>,
    expires_at: chrono::DateTime<chrono::Utc>,
}

/// The caller's live sessions (device, IP, created, last used), newest first; `current` marks this one.
#[utoipa::path(get, path = "/api/v1/users/me/sessions", tag = "users", security(("bearer" = [])),
    params(("X-Consistency-Token" = Option<String>, Header, description = "wait until this command is visible")),
    responses((status = 200, description = "sessions"), (status = 401, description = "not signed in")))]
async fn my_sessions(
    State(pool): State<PgPool>,
    caller: Caller,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    // Sessions, filtered by the session version in users.
    let consistency = consistency.wait(&[ReadModel::Sessions, ReadModel::Users]).await?;
    // Sessions superseded by a later sign-out everywhere, password change or reset are over too.
    let rows: Vec<SessionRow> = sqlx::query_as(
        "SELECT s.id, s.device, s.ip, s.created_at, s.last_used_at, s.expires_at FROM sessions s \
         LEFT JOIN users u ON u.id = s.user_id \
         WHERE s.user_id = $1 AND s.revoked_at IS NULL AND s.expires_at > now() \
           AND s.session_version >= coalesce(u.session_version, 0) \
         ORDER BY s.created_at DESC LIMIT 100",
    )
    .bind(caller.id())
    .fetch_all(&pool)
    .await?;
    let sessions: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|row| {
            let current = row.id == caller.claims.sid;
            let mut value = json!(row);
            value["current"] = json!(current);
            value
        })
        .collect();
    Ok(consistency.annotate(ApiResponse::ok(json!(sessions))))
}
