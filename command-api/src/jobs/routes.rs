//! HTTP handlers of the job and schedule commands. Each checks `jobs:manage` before anything
//! else, then hands the parsed input to [`super::commands`].

use axum::extract::State;
use axum::http::StatusCode;
use cairn_platform::auth::Caller;
use cairn_platform::clock::SharedClock;
use cairn_platform::http::{ApiError, ApiJson, ApiPath, ApiResponse, Envelope, RequestContext};
use cairn_platform::jobs::JobsSettings;
use serde_json::json;
use sqlx::PgPool;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::commands::{self, DefineSchedule, EnqueueJob};
use crate::answers::{JobIdData, JobStatusData, ScheduleNameData};
use crate::CommandState;

/// The job and schedule command routes.
pub fn routes() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(enqueue_job))
        .routes(routes!(retry_job))
        .routes(routes!(cancel_job))
        .routes(routes!(define_schedule))
        .routes(routes!(remove_schedule))
}

/// Enqueues a job (JobEnqueued, naming the caller). Needs `jobs:manage`. The same
/// `idempotency_key` answers with the same `job_id` while that job exists, and records nothing.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = EnqueueJob, security(("bearer" = [])),
    responses((status = 202, description = "accepted: it runs when due", body = Envelope<JobIdData>),
              (status = 400, description = "an unknown kind, arguments its handler refuses (a webhook host not allowed), or a field out of bounds; `details` names it"),
              (status = 403, description = "lacks jobs:manage")))]
async fn enqueue_job(
    State(pool): State<PgPool>,
    State(settings): State<Arc<JobsSettings>>,
    State(clock): State<SharedClock>,
    caller: Caller,
    ctx: RequestContext,
    ApiJson(body): ApiJson<EnqueueJob>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("jobs:manage")?;
    let request = commands::check_request(&body, &settings)?;
    let actor = caller.id().to_string();
    let outcome =
        commands::enqueue(&pool, request, &actor, commands::metadata(&ctx, Some(&actor)), clock.now()).await?;
    let response = ApiResponse::with_status(StatusCode::ACCEPTED, json!({ "job_id": outcome.job_id }));
    Ok(if outcome.created { response.consistency(outcome.token) } else { response })
}

/// Runs a dead or failed job again (JobRetried): queued now with its attempts back to 0; the
/// errors of its earlier attempts are kept. Needs `jobs:manage`.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "jobs", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "job id")),
    responses((status = 200, description = "queued again", body = Envelope<JobStatusData>),
              (status = 403, description = "lacks jobs:manage"),
              (status = 404, description = "no such job"),
              (status = 409, description = "neither dead nor failed; `details.status` says what it is")))]
async fn retry_job(
    State(pool): State<PgPool>,
    State(clock): State<SharedClock>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("jobs:manage")?;
    let actor = caller.id().to_string();
    let token = commands::retry(&pool, id, commands::metadata(&ctx, Some(&actor)), clock.now()).await?;
    Ok(ApiResponse::ok(json!({ "job_id": id, "status": "queued" })).consistency(token))
}

/// Cancels a job that has not started (JobCancelled). Needs `jobs:manage`.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "job id")),
    responses((status = 200, description = "cancelled", body = Envelope<JobStatusData>),
              (status = 403, description = "lacks jobs:manage"),
              (status = 404, description = "no such job"),
              (status = 409, description = "neither queued nor scheduled; `details.status` says what it is")))]
async fn cancel_job(
    State(pool): State<PgPool>,
    State(clock): State<SharedClock>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("jobs:manage")?;
    let actor = caller.id().to_string();
    let token = commands::cancel(&pool, id, commands::metadata(&ctx, Some(&actor)), clock.now()).await?;
    Ok(ApiResponse::ok(json!({ "job_id": id, "status": "cancelled" })).consistency(token))
}

/// Defines or redefines a cron schedule (ScheduleDefined): each tick enqueues one job, once
/// across every worker process. Needs `jobs:manage`. The same definition again changes nothing.
#[utoipa::path(post, path = "/api/v1/schedules", tag = "jobs", request_body = DefineSchedule, security(("bearer" = [])),
    responses((status = 201, description = "defined", body = Envelope<ScheduleNameData>),
              (status = 200, description = "redefined, or unchanged", body = Envelope<ScheduleNameData>),
              (status = 400, description = "a bad name, cron expression, time zone, kind or arguments; `details` names it"),
              (status = 403, description = "lacks jobs:manage"),
              (status = 409, description = "the name is defined by configuration, or was defined concurrently")))]
async fn define_schedule(
    State(pool): State<PgPool>,
    State(settings): State<Arc<JobsSettings>>,
    State(clock): State<SharedClock>,
    caller: Caller,
    ctx: RequestContext,
    ApiJson(body): ApiJson<DefineSchedule>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("jobs:manage")?;
    let name = body.name.clone();
    let actor = caller.id().to_string();
    let (created, token) =
        commands::define_schedule(&pool, &settings, body, commands::metadata(&ctx, Some(&actor)), clock.now()).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(ApiResponse::with_status(status, json!({ "name": name })).consistency(token))
}

/// Removes a schedule defined over the API (ScheduleRemoved). Needs `jobs:manage`.
#[utoipa::path(delete, path = "/api/v1/schedules/{name}", tag = "jobs", security(("bearer" = [])),
    params(("name" = String, Path, description = "schedule name", pattern = "^[a-z0-9][a-z0-9._-]{0,99}$")),
    responses((status = 200, description = "removed", body = Envelope<ScheduleNameData>),
              (status = 403, description = "lacks jobs:manage"),
              (status = 404, description = "no such schedule"),
              (status = 409, description = "defined by configuration (CAIRN_SCHEDULES_FILE) or built in")))]
async fn remove_schedule(
    State(pool): State<PgPool>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(name): ApiPath<String>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    caller.require("jobs:manage")?;
    if !cairn_domain::schedule::valid_schedule_name(&name) {
        return Err(ApiError::field("name", "must be 1 to 100 lower-case letters, digits, '.', '_' or '-'"));
    }
    let actor = caller.id().to_string();
    let token = commands::remove_schedule(&pool, &name, commands::metadata(&ctx, Some(&actor))).await?;
    Ok(ApiResponse::ok(json!({ "name": name })).consistency(token))
}
