//! `GET /api/v1/admin/projections`, `GET /api/v1/admin/projections/{name}/parked` and
//! `POST /api/v1/admin/projections/{name}/rebuild`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use cairn_platform::auth::Caller;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiPath, ApiQuery, ApiResponse, Envelope, PageParams};
use cairn_projector::rebuild::{self, RebuildOptions, StartError};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::status::{self, Consumers, ParkedRow, ProjectionStatus, RebuildStatus, WorkerStatus};
use crate::consistency::{ConsistencyRequest, ReadModel};
use crate::QueryState;

/// The operator routes.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(list_projections)).routes(routes!(list_parked)).routes(routes!(start_rebuild))
}

/// How the rebuilds this process starts run.
#[derive(Debug, Clone)]
pub struct Rebuilds {
    /// Events per batch (`CAIRN_REBUILD_BATCH`).
    pub batch: i64,
    /// The test knob `CAIRN_FAULT_REBUILD_PAUSE_MS` (zero otherwise).
    pub pause: Duration,
    /// Stops a running rebuild (recorded as failed, live tables untouched) when the process stops.
    pub shutdown: CancellationToken,
}

/// The health of every consumer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConsumersStatus {
    /// Each projection.
    pub projections: Vec<ProjectionStatus>,
    /// Each worker.
    pub workers: Vec<WorkerStatus>,
}

/// Every projection's checkpoint, lag in events and milliseconds, state and parked count, and
/// every worker's parked count. Needs `projections:manage`.
#[utoipa::path(get, path = "/api/v1/admin/projections", tag = "admin", security(("bearer" = [])),
    params(crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "each projection and worker", body = Envelope<ConsumersStatus>),
              (status = 403, description = "lacks projections:manage")))]
async fn list_projections(
    State(pool): State<PgPool>,
    State(consumers): State<Consumers>,
    caller: Caller,
    consistency: ConsistencyRequest,
) -> Result<ApiResponse<ConsumersStatus>, ApiError> {
    caller.require("projections:manage")?;
    // Operators look here when a projection is stuck: say whether the token is applied, never wait.
    let consistency = consistency.now(&ReadModel::ALL).await?;
    let projections = status::projections(&pool, &consumers.projections).await?;
    let workers = status::workers(&pool, &consumers.workers).await?;
    Ok(consistency.annotate(ApiResponse::ok(ConsumersStatus { projections, workers })))
}

/// `GET …/parked` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ParkedQuery {
    /// `parked` (default), `resolved`, `skipped` or `all`.
    #[param(pattern = "^(parked|resolved|skipped|all)$")]
    status: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor`.
    #[param(pattern = r"^[0-9]{1,19}\.[0-9]{1,18}$")]
    cursor: Option<String>,
}

/// The events a projection or worker parked, in log order, with the error of the latest attempt.
/// Needs `projections:manage`. Send a retry's consistency token to see its outcome.
#[utoipa::path(get, path = "/api/v1/admin/projections/{name}/parked", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "projection or worker", pattern = r"^[a-z0-9_-]{1,64}$"), ParkedQuery,
           crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "a page of parked events; meta.next_cursor", body = Envelope<Vec<ParkedRow>>),
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

/// Starts rebuilding a projection from the log beside its live tables; it runs in the background
/// of this process and swaps the new tables in when caught up, while reads go on. Follow it in
/// `GET /api/v1/admin/projections`. Needs `projections:manage`.
#[utoipa::path(post, path = "/api/v1/admin/projections/{name}/rebuild", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "projection", pattern = r"^[a-z0-9_-]{1,64}$")),
    responses((status = 202, description = "started; the rebuild's status", body = Envelope<RebuildStatus>),
              (status = 403, description = "lacks projections:manage"), (status = 404, description = "no such projection"),
              (status = 409, description = "a rebuild of this projection is running; details say since when and how far")))]
async fn start_rebuild(
    State(pool): State<PgPool>,
    State(rebuilds): State<Rebuilds>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<ApiResponse<RebuildStatus>, ApiError> {
    caller.require("projections:manage")?;
    let claim = match rebuild::claim(&pool, &name, &caller.id().to_string()).await {
        Ok(claim) => claim,
        Err(StartError::Unknown(_)) => return Err(ApiError::NotFound(format!("no projection named '{name}'"))),
        Err(e @ StartError::Running(_, _)) => {
            let mut details = std::collections::BTreeMap::new();
            if let StartError::Running(_, Some(row)) = &e {
                details.insert("started_at".to_owned(), row.started_at.to_rfc3339());
                details.insert("events_done".to_owned(), row.events_done.to_string());
                details.insert("events_total".to_owned(), row.events_total.to_string());
                details.insert("requested_by".to_owned(), row.requested_by.clone());
            }
            return Err(ApiError::ConflictWith { message: e.to_string(), details });
        }
        Err(StartError::Db(e)) => return Err(e.into()),
    };
    let status = RebuildStatus::of(claim.row(), chrono::Utc::now());
    let options = RebuildOptions {
        batch: rebuilds.batch,
        swap: true,
        pause: rebuilds.pause,
        shutdown: rebuilds.shutdown.clone(),
    };
    tracing::info!(projection = claim.name(), requested_by = %caller.id(), "rebuild started");
    tokio::spawn(async move {
        // The outcome is recorded in its row (and logged) by the rebuild itself.
        let _ = claim.run(&pool, &options).await;
    });
    Ok(ApiResponse::with_status(StatusCode::ACCEPTED, status))
}
