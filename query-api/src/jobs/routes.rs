//! `GET /api/v1/jobs`, `GET /api/v1/jobs/{id}` and `GET /api/v1/schedules`.

use axum::extract::State;
use cairn_platform::auth::Caller;
use cairn_platform::clock::SharedClock;
use cairn_platform::http::{ApiError, ApiPath, ApiQuery, ApiResponse, Envelope, PageParams};
use cairn_platform::jobs::JobStatus;
use serde::Deserialize;
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::store::{self, JobFilter, JobView, ScheduleView};
use crate::consistency::ConsistencyRequest;
use crate::users::Cursor;
use crate::QueryState;

/// The job and schedule read routes.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(list_jobs)).routes(routes!(get_job)).routes(routes!(list_schedules))
}

/// `GET /api/v1/jobs` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    /// As shown: `queued` includes scheduled jobs whose time has come.
    #[param(inline)]
    status: Option<JobStatus>,
    /// This kind only.
    #[param(pattern = r"^[a-z][a-z0-9._-]{0,99}$")]
    kind: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor`.
    cursor: Option<String>,
}

/// Jobs, newest first, cursor-paginated, with every attempt's error. Needs `jobs:manage`. Read
/// from the queue itself: a command's effect is visible at once.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", security(("bearer" = [])),
    params(JobsQuery, crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "a page of jobs; meta.next_cursor", body = Envelope<Vec<JobView>>),
              (status = 400, description = "a bad status, kind, limit or cursor"),
              (status = 403, description = "lacks jobs:manage")))]
async fn list_jobs(
    State(pool): State<PgPool>,
    State(clock): State<SharedClock>,
    caller: Caller,
    consistency: ConsistencyRequest,
    ApiQuery(query): ApiQuery<JobsQuery>,
) -> Result<ApiResponse<Vec<JobView>>, ApiError> {
    caller.require("jobs:manage")?;
    let limit = PageParams { limit: query.limit, cursor: None }.limit()?;
    if let Some(kind) = &query.kind {
        if !cairn_domain::job::valid_kind(kind) {
            return Err(ApiError::field("kind", "must be a kind name such as 'webhook.deliver'"));
        }
    }
    let after = match &query.cursor {
        Some(raw) => Some(
            Cursor::decode(raw).ok_or_else(|| ApiError::field("cursor", "is not a cursor from meta.next_cursor"))?,
        ),
        None => None,
    };
    // The table is written with each command; there is no projection to wait for.
    let consistency = consistency.unchecked().await?;
    let filter = JobFilter { status: query.status, kind: query.kind };
    let (items, next) = store::list(&pool, &filter, after, limit, clock.now()).await?;
    Ok(consistency.annotate(ApiResponse::ok(items).meta("next_cursor", next.map(|c| c.encode()))))
}

/// One job: its arguments, status, attempts and every attempt's error, when it runs next, who
/// enqueued it, and while it runs the lease. Needs `jobs:manage`.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "job id"), crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "the job", body = Envelope<JobView>),
              (status = 403, description = "lacks jobs:manage"),
              (status = 404, description = "no such job")))]
async fn get_job(
    State(pool): State<PgPool>,
    State(clock): State<SharedClock>,
    caller: Caller,
    consistency: ConsistencyRequest,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<JobView>, ApiError> {
    caller.require("jobs:manage")?;
    let consistency = consistency.unchecked().await?;
    let job = store::find(&pool, id, clock.now()).await?.ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    Ok(consistency.annotate(ApiResponse::ok(job)))
}

/// `GET /api/v1/schedules` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SchedulesQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor`.
    cursor: Option<String>,
}

/// Every schedule by name: its expression and zone, where it was defined, its next tick and the
/// last one fired with the job it enqueued. Needs `jobs:manage`.
#[utoipa::path(get, path = "/api/v1/schedules", tag = "jobs", security(("bearer" = [])),
    params(SchedulesQuery, crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "a page of schedules; meta.next_cursor", body = Envelope<Vec<ScheduleView>>),
              (status = 400, description = "a bad limit or cursor"),
              (status = 403, description = "lacks jobs:manage")))]
async fn list_schedules(
    State(pool): State<PgPool>,
    caller: Caller,
    consistency: ConsistencyRequest,
    ApiQuery(query): ApiQuery<SchedulesQuery>,
) -> Result<ApiResponse<Vec<ScheduleView>>, ApiError> {
    caller.require("jobs:manage")?;
    let limit = PageParams { limit: query.limit, cursor: None }.limit()?;
    let after = match &query.cursor {
        Some(raw) => Some(
            store::decode_name_cursor(raw)
                .ok_or_else(|| ApiError::field("cursor", "is not a cursor from meta.next_cursor"))?,
        ),
        None => None,
    };
    let consistency = consistency.unchecked().await?;
    let (items, next) = store::schedules(&pool, after.as_deref(), limit).await?;
    Ok(consistency.annotate(ApiResponse::ok(items).meta("next_cursor", next.map(|n| store::encode_name_cursor(&n)))))
}
