//! HTTP handlers of the files lists and of one file's metadata.

use axum::extract::State;
use cairn_platform::auth::Caller;
use cairn_platform::files::FileView;
use cairn_platform::http::{ApiError, ApiPath, ApiQuery, ApiResponse, Envelope, PageParams};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::access;
use super::store::{self, FileCursor, Listing};
use crate::consistency::{ConsistencyRequest, ReadModel};
use crate::QueryState;

/// The list and metadata routes.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(list_files)).routes(routes!(get_file))
}

/// `GET /api/v1/files` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// `me` (default): the caller's own files; `shared`: the files shared with the caller.
    #[param(pattern = "^(me|shared)$")]
    owner: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor`.
    cursor: Option<String>,
}

/// The caller's own files (newest upload first) or, with `owner=shared`, the files shared with
/// the caller (most recently shared first); cursor-paginated. Deleted files are never listed.
#[utoipa::path(get, path = "/api/v1/files", tag = "files", security(("bearer" = [])),
    params(ListQuery, crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "a page of files; meta.next_cursor", body = Envelope<Vec<FileView>>),
              (status = 403, description = "FORBIDDEN: the caller lacks files:read")))]
#[tracing::instrument(skip_all)]
async fn list_files(
    State(state): State<QueryState>,
    caller: Caller,
    consistency: ConsistencyRequest,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<ApiResponse<Vec<FileView>>, ApiError> {
    caller.require("files:read")?;
    let listing = match query.owner.as_deref() {
        None | Some("me") => Listing::Own,
        Some("shared") => Listing::SharedWithMe,
        Some(_) => return Err(ApiError::field("owner", "must be 'me' or 'shared'")),
    };
    let limit = PageParams { limit: query.limit, cursor: None }.limit()?;
    let after = match &query.cursor {
        Some(raw) => Some(
            FileCursor::decode(raw)
                .ok_or_else(|| ApiError::field("cursor", "is not a cursor from meta.next_cursor"))?,
        ),
        None => None,
    };
    let consistency = consistency.wait(&[ReadModel::Files]).await?;
    let (files, next) = store::list(&state.pool, caller.id(), listing, after, limit).await?;
    Ok(consistency.annotate(ApiResponse::ok(files).meta("next_cursor", next.map(FileCursor::encode))))
}

/// One file the caller may read: its owner, an admin, a user it is shared with, any holder of
/// `files:read` for a public file, or a member of a room where a message has it attached. With
/// `shared_with` for its owner and admins, and a `download_url` that needs no `Authorization`
/// header (for `<img src>`), valid for `CAIRN_FILES_URL_TTL_SECS`.
#[utoipa::path(get, path = "/api/v1/files/{id}", tag = "files", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "file id"), crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "the file", body = Envelope<FileView>),
              (status = 403, description = "FORBIDDEN: the caller lacks files:read"),
              (status = 404, description = "no such file, a deleted one, or one the caller may not read")))]
#[tracing::instrument(skip_all, fields(file = %id))]
async fn get_file(
    State(state): State<QueryState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<FileView>, ApiError> {
    caller.require("files:read")?;
    // Whether a room member may read it is decided on the rooms read model too.
    let consistency = consistency.wait(&[ReadModel::Files, ReadModel::Rooms]).await?;
    let file = access::readable(&state.pool, &caller, id).await?;
    let mut view = file.view;
    if file.manages {
        view.shared_with = Some(store::shared_with(&state.pool, id).await?);
    }
    let token = state.auth.tokens.issue_download(id, &caller.claims, state.downloads.url_ttl)?;
    view.download_url = Some(format!("/api/v1/files/{id}/download?token={token}"));
    Ok(consistency.annotate(ApiResponse::ok(view)))
}
