//! `GET /api/v1/files/{id}/download`: the bytes of a file the caller may read.
//!
//! From the local store the bytes are streamed as the store yields them (never whole in memory),
//! with one `Range` honoured (206) and `If-None-Match` answered 304. From S3 the answer is a 302
//! to a presigned URL, so the bytes never pass through this process. The caller is the bearer
//! token's, or, for `<img src>` and plain links, the `token` query parameter's (a download token
//! for this very file, from `GET /files/{id}`); either way the reader rule is checked again now.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use cairn_platform::auth::Caller;
use cairn_platform::http::{ApiError, ApiPath, ApiQuery};
use cairn_storage::{ByteRange, StoreError};
use futures::TryStreamExt;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::access::{self, ReadableFile};
use super::headers::{self, RangeRequest};
use crate::QueryState;

/// The download route.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(download))
}

/// `GET /api/v1/files/{id}/download` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DownloadQuery {
    /// A download token from the file's `download_url`, instead of `Authorization`.
    token: Option<String>,
}

/// The file's bytes. Local store: streamed with `Content-Type`, `Content-Length`, `ETag` (the
/// sha256), `Accept-Ranges`, `Content-Disposition` (`inline` for `CAIRN_FILES_INLINE_TYPES`, else
/// `attachment`); one `Range` gives 206, several the whole file; `If-None-Match` gives 304. S3:
/// 302 to a presigned URL valid for `CAIRN_FILES_URL_TTL_SECS`. Authenticated by the bearer token
/// or by `?token=` (a download token for this file).
#[utoipa::path(get, path = "/api/v1/files/{id}/download", tag = "files", security(("bearer" = []), ()),
    params(("id" = Uuid, Path, description = "file id"), DownloadQuery),
    responses((status = 200, description = "the whole file", content_type = "*/*"),
              (status = 206, description = "the one range asked for, with Content-Range", content_type = "*/*"),
              (status = 302, description = "S3: Location is a presigned URL"),
              (status = 304, description = "If-None-Match holds the file's ETag"),
              (status = 401, description = "UNAUTHENTICATED: no token, or a bearer or download token that is malformed, expired, revoked or for another file"),
              (status = 403, description = "FORBIDDEN: the caller lacks files:read"),
              (status = 404, description = "no such file, a deleted one, or one the caller may not read"),
              (status = 416, description = "RANGE_NOT_SATISFIABLE: the range starts past the end; Content-Range: bytes */size")))]
#[tracing::instrument(skip_all, fields(file = %id))]
async fn download(
    State(state): State<QueryState>,
    bearer: Option<Caller>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<DownloadQuery>,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = match (bearer, query.token) {
        (Some(caller), _) => caller,
        (None, Some(token)) => state.auth.download_caller(&token, id)?,
        (None, None) => {
            return Err(ApiError::Unauthenticated(
                "authentication required: 'Authorization: Bearer <token>' or '?token=<download token>'".into(),
            ))
        }
    };
    let file = access::readable(&state.pool, &caller, id).await?;
    let disposition = headers::content_disposition(&file.view.name, state.downloads.inline(&file.view.content_type));
    let presigned = state
        .files
        .presigned_get(&file.storage_key, state.downloads.url_ttl, &file.view.content_type, &disposition)
        .await
        .map_err(|e| store_failure(id, e))?;
    if let Some(url) = presigned {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, url)
            // The URL is a credential for its lifetime: nobody keeps it.
            .header(header::CACHE_CONTROL, "no-store")
            .body(Body::empty())
            .map_err(|e| ApiError::Internal(e.into()));
    }
    stream(&state, &file, &disposition, &request).await
}

/// Answers from the local store: 304, 206 or 200 with the bytes streamed.
async fn stream(
    state: &QueryState,
    file: &ReadableFile,
    disposition: &str,
    request: &HeaderMap,
) -> Result<Response, ApiError> {
    let id = file.view.id;
    let size = file.view.size;
    let etag = headers::etag(&file.view.sha256);
    let text = |name: header::HeaderName| request.get(name).and_then(|v| v.to_str().ok());
    let common = |status: StatusCode| {
        Response::builder()
            .status(status)
            .header(header::ETAG, &etag)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::CACHE_CONTROL, "private")
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
            // What a file is must never run as this origin's page, whatever it holds.
            .header(header::CONTENT_SECURITY_POLICY, "default-src 'none'; frame-ancestors 'none'; sandbox")
    };
    if text(header::IF_NONE_MATCH).is_some_and(|h| headers::none_match(h, &etag)) {
        return common(StatusCode::NOT_MODIFIED).body(Body::empty()).map_err(|e| ApiError::Internal(e.into()));
    }
    // A Range whose If-Range names another version of the file gets the whole file.
    let range = match text(header::RANGE) {
        Some(range) if text(header::IF_RANGE).is_none_or(|h| headers::if_range_holds(h, &etag)) => {
            headers::parse_range(range, size)
        }
        _ => RangeRequest::Whole,
    };
    let range = match range {
        RangeRequest::Whole => None,
        RangeRequest::Part(part) => Some(part),
        RangeRequest::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable { size }),
    };
    let object = state.files.get(&file.storage_key, range).await.map_err(|e| store_failure(id, e))?;
    if object.size != size {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "file {id}: the store holds {} bytes, FileUploaded recorded {size}",
            object.size
        )));
    }
    let key = file.storage_key.clone();
    // A chunk that fails mid-way (bytes altered on disk) ends the body with an error: the
    // connection is cut, so the client sees a broken download, never altered bytes.
    let body = Body::from_stream(object.body.inspect_err(move |e| {
        tracing::error!(file = %id, key = %key, error = %e, "a stored file failed while being streamed; download cut off");
    }));
    let content_type = HeaderValue::from_str(&file.view.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    let builder = common(if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK })
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_DISPOSITION, disposition);
    let builder = match range {
        Some(ByteRange { start, end }) => builder
            .header(header::CONTENT_LENGTH, end - start + 1)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}")),
        None => builder.header(header::CONTENT_LENGTH, size),
    };
    builder.body(body).map_err(|e| ApiError::Internal(e.into()))
}

/// The answer to a store failure: bytes altered on disk are a 500 with an error line of their
/// own; a store out of reach is a 503; bytes gone (the file deleted meanwhile) a 404.
fn store_failure(id: Uuid, error: StoreError) -> ApiError {
    match error {
        StoreError::NotFound(key) => {
            tracing::warn!(file = %id, key = %key, "a readable file has no bytes in the store (deleted meanwhile?)");
            access::file_not_found()
        }
        StoreError::RangeNotSatisfiable { size } => ApiError::RangeNotSatisfiable { size },
        StoreError::Corrupt { key, chunk } => {
            tracing::error!(file = %id, key = %key, chunk, "stored bytes failed authentication; download refused");
            ApiError::Internal(anyhow::anyhow!("file {id}: stored bytes failed authentication at chunk {chunk}"))
        }
        StoreError::Unavailable(reason) => ApiError::ServiceUnavailable(format!("file store: {reason}")),
        other => ApiError::Internal(anyhow::anyhow!("file {id}: {other}")),
    }
}
