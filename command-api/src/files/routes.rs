//! HTTP handlers of the file commands. Each parses its input and hands it to [`FileCommands`],
//! which checks permissions and ownership.

use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use cairn_platform::auth::Caller;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiJson, ApiPath, ApiResponse, Envelope, RequestContext};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;
use uuid::Uuid;

use super::FileCommands;
use crate::answers::{FileData, FileIdData, FileShareData};
use crate::CommandState;

/// The file command routes. The upload route takes bodies up to `upload_body_limit` bytes (the
/// largest file and its framing) instead of the general `CAIRN_MAX_BODY_BYTES`.
pub fn routes(upload_body_limit: usize) -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(upload_file).layer(DefaultBodyLimit::max(upload_body_limit)))
        .routes(routes!(delete_file))
        .routes(routes!(share_file))
        .routes(routes!(unshare_file))
}

/// An accepted command: the answer's `meta.consistency_token` lets a read wait for it.
fn accepted<T: Serialize>(status: StatusCode, data: T, token: ConsistencyToken) -> ApiResponse<T> {
    ApiResponse::with_status(status, data).consistency(token)
}

/// `POST /api/v1/files` body (`multipart/form-data`).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The file, exactly once. Its type is sniffed from its bytes; the part's `Content-Type`, when
    /// given, must agree. Its file name is kept, sanitised.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// `private` (the default) or `public`.
    #[schema(pattern = "^(private|public)$")]
    visibility: Option<String>,
}

/// `POST /api/v1/files/{id}/shares` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareBody {
    /// An active user other than the owner.
    user_id: Uuid,
}

/// Uploads a file (FileUploaded): streamed to storage while its SHA-256, size and type (sniffed
/// from its bytes) are computed. Needs `files:write`. Up to `CAIRN_MAX_UPLOAD_BYTES`, within the
/// caller's `CAIRN_USER_QUOTA_BYTES`, of a type in `CAIRN_FILES_ALLOWED_TYPES`.
#[utoipa::path(post, path = "/api/v1/files", tag = "files", security(("bearer" = [])),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 201, description = "stored and recorded", body = Envelope<FileData>),
              (status = 400, description = "no `file` field, two, an unknown field, a bad visibility, or a broken body"),
              (status = 403, description = "lacks files:write"),
              (status = 413, description = "over CAIRN_MAX_UPLOAD_BYTES, or over the quota (`details`: quota_bytes, stored_bytes)"),
              (status = 415, description = "not multipart, a type not allowed, or a declared type the bytes contradict")))]
async fn upload_file(
    State(files): State<FileCommands>,
    caller: Caller,
    ctx: RequestContext,
    request: Request,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    // The permission is checked before the body is read: a caller who may not upload is told so,
    // whatever they send.
    caller.require("files:write")?;
    let content_length =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let multipart = Multipart::from_request(request, &()).await.map_err(|_| {
        ApiError::UnsupportedMediaType("the body must be multipart/form-data with a boundary".to_owned())
    })?;
    let (file, token) = files.upload(&caller, content_length, multipart, &ctx).await?;
    Ok(accepted(StatusCode::CREATED, json!({ "file": file }), token))
}

/// Deletes a file (FileDeleted): reads stop at once, a worker removes the bytes. Needs
/// `files:write`; the owner or an admin.
#[utoipa::path(delete, path = "/api/v1/files/{id}", tag = "files", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "file id")),
    responses((status = 200, description = "deleted", body = Envelope<FileIdData>),
              (status = 403, description = "lacks files:write, or shared with the caller who is not its owner"),
              (status = 404, description = "no such file, deleted, or not the caller's")))]
async fn delete_file(
    State(files): State<FileCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = files.delete(&caller, id, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "id": id }), token))
}

/// Lets an active user read a file (FileShared). Needs `files:write`; the owner or an admin.
#[utoipa::path(post, path = "/api/v1/files/{id}/shares", tag = "files", request_body = ShareBody, security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "file id")),
    responses((status = 200, description = "shared", body = Envelope<FileShareData>),
              (status = 400, description = "the owner (who needs no share), or a bad body"),
              (status = 403, description = "lacks files:write, or shared with the caller who is not its owner"),
              (status = 404, description = "no such file (or not the caller's), or no such active user"),
              (status = 409, description = "shared with that user already")))]
async fn share_file(
    State(files): State<FileCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<ShareBody>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = files.share(&caller, id, body.user_id, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "file_id": id, "user_id": body.user_id }), token))
}

/// Stops letting a user read a file (FileUnshared). Needs `files:write`; the owner or an admin.
#[utoipa::path(delete, path = "/api/v1/files/{id}/shares/{user_id}", tag = "files", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "file id"), ("user_id" = Uuid, Path, description = "the user it is shared with")),
    responses((status = 200, description = "unshared", body = Envelope<FileShareData>),
              (status = 403, description = "lacks files:write, or shared with the caller who is not its owner"),
              (status = 404, description = "no such file (or not the caller's), or not shared with that user")))]
async fn unshare_file(
    State(files): State<FileCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath((id, user_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let token = files.unshare(&caller, id, user_id, &ctx).await?;
    Ok(accepted(StatusCode::OK, json!({ "file_id": id, "user_id": user_id }), token))
}
