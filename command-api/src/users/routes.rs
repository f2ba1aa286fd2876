//! HTTP handlers of the user commands. Each checks one named permission, parses its input and
//! hands a command to [`UserCommands`]; none holds business rules.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use cairn_domain::{DisplayName, RoleName, UserCommand};
use cairn_platform::auth::{AuthState, Caller};
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiJson, ApiPath, ApiResponse, RequestContext};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{RegisterUser, UserCommands};
use crate::answers::{Jwks, UserIdData, UserRoleData};
use crate::CommandState;
use cairn_platform::http::Envelope;

/// The user command routes.
pub fn routes() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(update_me))
        .routes(routes!(grant_role))
        .routes(routes!(revoke_role))
        .routes(routes!(deactivate))
        .routes(routes!(reactivate))
        .routes(routes!(delete_user))
        .routes(routes!(jwks))
}

/// An accepted command: the answer's `meta.consistency_token` lets a read wait for it.
fn accepted<T: Serialize>(status: StatusCode, data: T, token: ConsistencyToken) -> ApiResponse<T> {
    ApiResponse::with_status(status, data).consistency(token)
}

/// `POST /api/v1/auth/register` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// The address to sign in with; verified by a mailed link.
    #[schema(format = Email, max_length = 254)]
    email: String,
    /// 8 to 128 characters, and strong enough (judged also against the email and name).
    #[schema(min_length = 8, max_length = 128)]
    password: String,
    /// 1 to 100 characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    display_name: String,
}

impl std::fmt::Debug for RegisterBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterBody")
            .field("email", &self.email)
            .field("display_name", &self.display_name)
            .field("password", &"REDACTED")
            .finish()
    }
}

/// Opens an account (UserRegistered) with the `user` role.
#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = RegisterBody,
    responses((status = 201, description = "registered: data.user_id, meta.consistency_token", body = Envelope<UserIdData>),
              (status = 400, description = "VALIDATION_FAILED (a weak password, a bad address or name) or MALFORMED_REQUEST"),
              (status = 409, description = "email already registered")))]
async fn register(
    State(users): State<UserCommands>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let input =
        RegisterUser { email: body.email, password: body.password, display_name: body.display_name, roles: vec![] };
    let (id, token) = users.register(input, &ctx, None).await?;
    Ok(accepted(StatusCode::CREATED, json!({ "user_id": id }), token))
}

/// `PATCH /api/v1/users/me` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMeBody {
    /// 1 to 100 characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    display_name: String,
}

/// Changes the caller's display name (DisplayNameChanged). Needs `profile:write`.
#[utoipa::path(patch, path = "/api/v1/users/me", tag = "users", request_body = UpdateMeBody, security(("bearer" = [])),
    responses((status = 200, description = "changed", body = Envelope<UserIdData>),
              (status = 403, description = "lacks profile:write"), (status = 404, description = "the caller's account is gone")))]
async fn update_me(
    State(users): State<UserCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiJson(body): ApiJson<UpdateMeBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("profile:write")?;
    let display_name = DisplayName::parse(&body.display_name).map_err(|e| ApiError::field("display_name", e.0))?;
    let token =
        users.execute(caller.id(), UserCommand::ChangeDisplayName { display_name }, &ctx, Some(caller.id())).await?;
    Ok(accepted(StatusCode::OK, json!({ "user_id": caller.id() }), token))
}

/// `POST /api/v1/users/{id}/roles` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRoleBody {
    /// An existing role's name.
    #[schema(pattern = r"^[a-z][a-z0-9_-]{0,63}$")]
    role: String,
}

async fn known_role(users: &UserCommands, raw: &str) -> Result<RoleName, ApiError> {
    let role = super::commands::role_name(raw)?;
    users.roles().existing(role.as_str()).await?.ok_or_else(|| ApiError::field("role", format!("unknown role '{raw}'")))
}

/// Grants a role (RoleGranted). Needs `roles:manage`.
#[utoipa::path(post, path = "/api/v1/users/{id}/roles", tag = "users", request_body = GrantRoleBody, security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id")),
    responses((status = 200, description = "granted", body = Envelope<UserRoleData>), (status = 400, description = "no such role"),
              (status = 403, description = "lacks roles:manage"),
              (status = 404, description = "no such user"), (status = 409, description = "already granted")))]
async fn grant_role(
    State(users): State<UserCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<GrantRoleBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("roles:manage")?;
    let role = known_role(&users, &body.role).await?;
    let name = role.as_str().to_owned();
    let token = users.execute(id, UserCommand::GrantRole { role }, &ctx, Some(caller.id())).await?;
    Ok(accepted(StatusCode::OK, json!({ "user_id": id, "role": name }), token))
}

/// Revokes a role (RoleRevoked); the user's current tokens stop working. Needs `roles:manage`.
#[utoipa::path(delete, path = "/api/v1/users/{id}/roles/{role}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id"),
           ("role" = String, Path, description = "role name", pattern = r"^[a-z][a-z0-9_-]{0,63}$")),
    responses((status = 200, description = "revoked", body = Envelope<UserRoleData>), (status = 403, description = "lacks roles:manage"),
              (status = 404, description = "no such user"), (status = 409, description = "not granted")))]
async fn revoke_role(
    State(users): State<UserCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath((id, role)): ApiPath<(Uuid, String)>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("roles:manage")?;
    let role = known_role(&users, &role).await?;
    let name = role.as_str().to_owned();
    let token = users.execute(id, UserCommand::RevokeRole { role }, &ctx, Some(caller.id())).await?;
    Ok(accepted(StatusCode::OK, json!({ "user_id": id, "role": name }), token))
}

async fn lifecycle(
    users: &UserCommands,
    caller: &Caller,
    ctx: &RequestContext,
    id: Uuid,
    command: UserCommand,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("users:write")?;
    if id == caller.id() && command != UserCommand::ReactivateUser {
        return Err(ApiError::Conflict("you cannot deactivate or delete your own account here".to_owned()));
    }
    let token = users.execute(id, command, ctx, Some(caller.id())).await?;
    Ok(accepted(StatusCode::OK, json!({ "user_id": id }), token))
}

/// Deactivates a user (UserDeactivated): their tokens stop working at once. Needs `users:write`.
#[utoipa::path(post, path = "/api/v1/users/{id}/deactivate", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id")),
    responses((status = 200, description = "deactivated", body = Envelope<UserIdData>), (status = 403, description = "lacks users:write"),
              (status = 404, description = "no such user"), (status = 409, description = "already deactivated")))]
async fn deactivate(
    State(users): State<UserCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    lifecycle(&users, &caller, &ctx, id, UserCommand::DeactivateUser).await
}

/// Reactivates a deactivated user (UserReactivated). Needs `users:write`.
#[utoipa::path(post, path = "/api/v1/users/{id}/reactivate", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id")),
    responses((status = 200, description = "reactivated", body = Envelope<UserIdData>), (status = 403, description = "lacks users:write"),
              (status = 404, description = "no such user"), (status = 409, description = "not deactivated")))]
async fn reactivate(
    State(users): State<UserCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    lifecycle(&users, &caller, &ctx, id, UserCommand::ReactivateUser).await
}

/// Soft-deletes a user (UserDeleted): their tokens stop working at once. Needs `users:write`.
#[utoipa::path(delete, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id")),
    responses((status = 200, description = "deleted", body = Envelope<UserIdData>), (status = 403, description = "lacks users:write"),
              (status = 404, description = "no such user"), (status = 409, description = "deleted already, or the caller's own account")))]
async fn delete_user(
    State(users): State<UserCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    lifecycle(&users, &caller, &ctx, id, UserCommand::DeleteUser).await
}

/// The public keys that verify access tokens (RFC 7517).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth", responses((status = 200, description = "JWKS", body = Jwks)))]
async fn jwks(State(auth): State<AuthState>) -> Json<serde_json::Value> {
    Json(auth.tokens.jwks())
}
