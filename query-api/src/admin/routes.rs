//! `GET /api/v1/admin/projections` and `GET /api/v1/admin/projections/{name}/parked`.

use axum::extract::State;
use cairn_platform::auth::Caller;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiPath, ApiQuery, ApiResponse, PageParams};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::status::{self, Consumers, ParkedRow};
use crate::consistency::{ConsistencyRequest, ReadModel};
use crate::QueryState;

/// The operator read routes.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(list_projections)).routes(routes!(list_parked))
}

/// Every projection's checkpoint, lag in events and milliseconds, state and parked count, and
/// every worker's parked count. Needs `projections:manage`.
#[utoipa::path(get, path = "/api/v1/admin/projections", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "`{projections: [...], workers: [...]}`"),
              (status = 403, description = "lacks projections:manage")))]
async fn list_projections(
    State(pool): State<PgPool>,
    State(consumers): State<Consumers>,
    caller: Caller,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("projections:manage")?;
    // Operators look here when a projection is stuck: say whether the token is applied, never wait.
    let consistency = consistency.now(&ReadModel::ALL).await?;
    let projections = status::projections(&pool, &consumers.projections).await?;
    let workers = status::workers(&pool, &consumers.workers).await?;
    Ok(consistency.annotate(ApiResponse::ok(json!({ "projections": projections, "workers": workers }))))
}

/// `GET …/parked` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ParkedQuery {
    /// `parked` (default), `resolved`, `skipped` or `all`.
    status: Option<String>,
    /// Page size, 1 to 100 (default 20).
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor`.
    cursor: Option<String>,
}

/// The events a projection or worker parked, in log order, with the error of the latest attempt.
/// Needs `projections:manage`. Send a retry's consistency token to see its outcome.
#[utoipa::path(get, path = "/api/v1/admin/projections/{name}/parked", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "projection or worker"), ParkedQuery,
           ("X-Consistency-Token" = Option<String>, Header, description = "wait until this command is visible")),
    responses((status = 200, description = "a page of parked events; meta.next_cursor"),
              (status = 403, description = "lacks projections:manage"), (status = 404, description = "no such consumer")))]
async fn list_parked(
    State(pool): State<PgPool>,
    State(consumers): State<Consumers>,
    caller: Caller,
    consistency: ConsistencyRequest,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ParkedQuery>,
) -> Result<ApiResponse<Vec<ParkedRow>>, ApiError> {
    caller.require("projections:manage")?;
    if !consumers.knows(&name) {
        return Err(ApiError::NotFound(format!("no projection or worker named '{name}'")));
    }
    let limit = PageParams { limit: query.limit, cursor: None }.limit()?;
    let status = match query.status.as_deref() {
        None | Some("parked") => Some("parked"),
        Some("all") => None,
        Some(s @ ("resolved" | "skipped")) => Some(s),
        Some(_) => return Err(ApiError::field("status", "must be one of parked, resolved, skipped, all")),
    };
    let after = match &query.cursor {
        Some(raw) => Some(
            raw.parse::<ConsistencyToken>()
                .map_err(|_| ApiError::field("cursor", "is not a cursor from meta.next_cursor"))?,
        ),
        None => None,
    };
    // A projection records what it parks with its checkpoint; a worker has no checkpoint to wait on.
    let consistency = match ReadModel::of_projection(&name) {
        Some(model) => consistency.wait(&[model]).await?,
        None => consistency.unchecked().await?,
    };
    let (rows, more) = status::parked(&pool, &name, status, after, limit).await?;
    let next = if more { rows.last().map(|r| r.position.clone()) } else { None };
    Ok(consistency.annotate(ApiResponse::ok(rows).meta("next_cursor", next)))
}
