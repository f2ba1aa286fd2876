//! HTTP handlers of the users read model.

use axum::extract::State;
use cairn_platform::auth::Caller;
use cairn_platform::http::{ApiError, ApiPath, ApiQuery, ApiResponse, Envelope, Page};
use serde::{Deserialize, Serialize};
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

/// The caller as `GET /api/v1/users/me` shows them: the user and the permissions their token carries.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Profile {
    /// The user.
    #[serde(flatten)]
    pub user: UserRow,
    /// Permissions of the caller's roles.
    pub permissions: Vec<String>,
}

/// The caller's profile, roles, permissions and verified flag.
#[utoipa::path(get, path = "/api/v1/users/me", tag = "users", security(("bearer" = [])),
    params(crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "profile", body = Envelope<Profile>),
              (status = 404, description = "not in the read model yet")))]
async fn me(
    State(pool): State<PgPool>,
    caller: Caller,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<Profile>, ApiError> {
    let consistency = consistency.wait(&[ReadModel::Users]).await?;
    let user = store::find(&pool, caller.id()).await?.ok_or_else(|| ApiError::NotFound("user not found".to_owned()))?;
    let profile = Profile { user, permissions: caller.claims.perms.clone() };
    Ok(consistency.annotate(ApiResponse::ok(profile)))
}

/// A user's status, as a filter.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum StatusFilter {
    Active,
    Deactivated,
    Deleted,
}

impl StatusFilter {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Deactivated => "deactivated",
            Self::Deleted => "deleted",
        }
    }
}

/// `GET /api/v1/users` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Substring of email or display name.
    #[param(max_length = 200, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$")]
    q: Option<String>,
    /// Holds this role.
    #[param(pattern = r"^[a-z][a-z0-9_-]{0,63}$")]
    role: Option<String>,
    /// `active`, `deactivated` or `deleted` (deleted users are listed only when asked for).
    #[param(inline)]
    status: Option<StatusFilter>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor`.
    cursor: Option<String>,
}

/// Users, newest first, cursor-paginated. Needs `users:read`.
#[utoipa::path(get, path = "/api/v1/users", tag = "users", security(("bearer" = [])),
    params(ListQuery, crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "a page of users; meta.next_cursor", body = Envelope<Vec<UserRow>>),
              (status = 403, description = "lacks users:read")))]
async fn list_users(
    State(pool): State<PgPool>,
    caller: Caller,
    consistency: ConsistencyRequest,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<ApiResponse<Vec<UserRow>>, ApiError> {
    caller.require("users:read")?;
    let limit = cairn_platform::http::PageParams { limit: query.limit, cursor: None }.limit()?;
    if query.q.as_ref().is_some_and(|q| q.chars().count() > 200) {
        return Err(ApiError::field("q", "must be at most 200 characters"));
    }
    if let Some(role) = &query.role {
        cairn_domain::RoleName::parse(role).map_err(|e| ApiError::field("role", e.0))?;
    }
    let after = match &query.cursor {
        Some(raw) => Some(
            Cursor::decode(raw).ok_or_else(|| ApiError::field("cursor", "is not a cursor from meta.next_cursor"))?,
        ),
        None => None,
    };
    let consistency = consistency.wait(&[ReadModel::Users]).await?;
    let status = query.status.map(|s| s.as_str().to_owned());
    let filter = UserFilter { q: query.q.filter(|q| !q.is_empty()), role: query.role, status };
    let (items, next) = store::list(&pool, &filter, after, limit).await?;
    let page = Page { items, next_cursor: next.map(|c| c.encode()) };
    Ok(consistency.annotate(ApiResponse::ok(page.items).meta("next_cursor", page.next_cursor)))
}

/// One user. Needs `users:read`, except for oneself.
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id"), crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "the user", body = Envelope<UserRow>),
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

/// A role and the permissions it grants.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RoleView {
    /// Its name.
    pub name: String,
    /// What it grants.
    pub permissions: Vec<String>,
}

/// The roles and the permissions each grants. Any signed-in caller.
#[utoipa::path(get, path = "/api/v1/roles", tag = "roles", security(("bearer" = [])),
    params(crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "roles", body = Envelope<Vec<RoleView>>)))]
async fn list_roles(
    State(pool): State<PgPool>,
    _caller: Caller,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<Vec<RoleView>>, ApiError> {
    let consistency = consistency.wait(&[ReadModel::Roles]).await?;
    let roles: Vec<RoleView> =
        sqlx::query_as("SELECT name, permissions FROM roles ORDER BY name").fetch_all(&pool).await?;
    Ok(consistency.annotate(ApiResponse::ok(roles)))
}

/// A session in the caller's list.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct SessionRow {
    /// Its id.
    pub id: Uuid,
    /// The device (user agent) it was started from.
    pub device: Option<String>,
    /// The address it was started from.
    pub ip: Option<String>,
    /// When it started.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When it was last refreshed.
    pub last_used_at: chrono::DateTime<chrono::Utc>,
    /// When it ends at the latest.
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// A session of the caller, and whether it is the one asking.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    /// The session.
    #[serde(flatten)]
    pub session: SessionRow,
    /// Whether this is the caller's own session.
    pub current: bool,
}

/// The caller's live sessions (device, IP, created, last used), newest first; `current` marks this one.
#[utoipa::path(get, path = "/api/v1/users/me/sessions", tag = "users", security(("bearer" = [])),
    params(crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "sessions", body = Envelope<Vec<SessionView>>)))]
async fn my_sessions(
    State(pool): State<PgPool>,
    caller: Caller,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<Vec<SessionView>>, ApiError> {
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
    let sessions =
        rows.into_iter().map(|session| SessionView { current: session.id == caller.claims.sid, session }).collect();
    Ok(consistency.annotate(ApiResponse::ok(sessions)))
}
