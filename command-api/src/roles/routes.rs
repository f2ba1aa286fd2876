//! `POST /api/v1/roles` and `PUT /api/v1/roles/{name}`.

use axum::extract::State;
use axum::http::StatusCode;
use cairn_domain::{RoleCommand, RoleName};
use cairn_platform::auth::Caller;
use cairn_platform::http::{ApiError, ApiJson, ApiPath, ApiResponse, RequestContext};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::RoleCatalog;
use crate::answers::RoleNameData;
use crate::CommandState;
use cairn_platform::http::Envelope;

/// The role routes.
pub fn routes() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new().routes(routes!(define_role)).routes(routes!(change_role))
}

/// `POST /api/v1/roles` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefineRoleBody {
    /// 1 to 64 of a-z, 0-9, `_`, `-`, starting with a letter.
    #[schema(pattern = r"^[a-z][a-z0-9_-]{0,63}$")]
    name: String,
    /// What the role grants.
    #[schema(schema_with = permissions_schema)]
    permissions: Vec<String>,
}

/// `PUT /api/v1/roles/{name}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeRoleBody {
    /// What the role grants from now on.
    #[schema(schema_with = permissions_schema)]
    permissions: Vec<String>,
}

/// A list of the permissions the service knows.
fn permissions_schema() -> utoipa::openapi::schema::Array {
    let permission = utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(cairn_domain::roles::ALL_PERMISSIONS.iter().copied()));
    utoipa::openapi::schema::ArrayBuilder::new().items(permission).build()
}

fn parse_name(raw: &str) -> Result<RoleName, ApiError> {
    RoleName::parse(raw).map_err(|e| ApiError::field("name", e.0))
}

/// Defines a role (RoleDefined). Needs `roles:manage`.
#[utoipa::path(post, path = "/api/v1/roles", tag = "roles", request_body = DefineRoleBody, security(("bearer" = [])),
    responses((status = 201, description = "defined", body = Envelope<RoleNameData>), (status = 400, description = "bad name or permission"),
              (status = 403, description = "lacks roles:manage"), (status = 409, description = "exists")))]
async fn define_role(
    State(roles): State<RoleCatalog>,
    caller: Caller,
    ctx: RequestContext,
    ApiJson(body): ApiJson<DefineRoleBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("roles:manage")?;
    let name = parse_name(&body.name)?;
    if roles.permissions_of(name.as_str()).await?.is_some() {
        return Err(ApiError::Conflict(format!("role '{}' already exists", name.as_str())));
    }
    let token =
        roles.execute(&name, RoleCommand::DefineRole { permissions: body.permissions }, &ctx, caller.id()).await?;
    Ok(ApiResponse::with_status(StatusCode::CREATED, json!({ "name": name.as_str() })).consistency(token))
}

/// Replaces a role's permissions (RolePermissionsChanged); holders get them in their next token.
/// Needs `roles:manage`. The `admin` role cannot be changed.
#[utoipa::path(put, path = "/api/v1/roles/{name}", tag = "roles", request_body = ChangeRoleBody, security(("bearer" = [])),
    params(("name" = String, Path, description = "role name", pattern = r"^[a-z][a-z0-9_-]{0,63}$")),
    responses((status = 200, description = "changed", body = Envelope<RoleNameData>), (status = 403, description = "lacks roles:manage"),
              (status = 404, description = "no such role"), (status = 409, description = "admin, or unchanged")))]
async fn change_role(
    State(roles): State<RoleCatalog>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<ChangeRoleBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("roles:manage")?;
    let name = parse_name(&name)?;
    if name.as_str() == "admin" {
        return Err(ApiError::Conflict("the admin role always holds every permission".to_owned()));
    }
    let token = roles
        .execute(&name, RoleCommand::ChangePermissions { permissions: body.permissions }, &ctx, caller.id())
        .await?;
    Ok(ApiResponse::ok(json!({ "name": name.as_str() })).consistency(token))
}
