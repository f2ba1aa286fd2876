//! The job and schedule commands. Each is one short transaction that changes the state row
//! (`jobs`, `schedules`) and appends its event together, so the log and the queue never
//! disagree; whether a change is allowed is decided by the conditional statement itself, so two
//! operators racing cannot both win. The HTTP routes and `cairn jobs` call these same functions.

use std::collections::BTreeMap;

use cairn_domain::{JobEvent, JobRequest, ScheduleEvent, ScheduleSpec};
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::ApiError;
use cairn_platform::jobs::schedule::{self, ScheduleDef, Source};
use cairn_platform::jobs::{self, JobsSettings, NewJob, RawEvent};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A job as asked for, before it is checked.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueJob {
    /// A registered kind: `noop`, `webhook.deliver`, `files.sweep`, `files.remove`,
    /// `analytics.rollup`, `sessions.purge`.
    #[schema(example = "webhook.deliver")]
    pub kind: String,
    /// The handler's arguments: a JSON object (`webhook.deliver`: `{url, body}`).
    #[schema(value_type = Object)]
    pub args: serde_json::Value,
    /// Not before this time (RFC 3339); at once when left out or in the past.
    pub run_at: Option<DateTime<Utc>>,
    /// Higher runs first, -100 to 100 (default 0).
    #[schema(minimum = -100, maximum = 100)]
    pub priority: Option<i64>,
    /// Attempts before the job is dead, 1 to 1000 (default 25).
    #[schema(minimum = 1, maximum = 1000)]
    pub max_attempts: Option<i64>,
    /// The same key returns the same job while the job exists (1 to 200 characters).
    #[schema(min_length = 1, max_length = 200)]
    pub idempotency_key: Option<String>,
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnqueueOutcome {
    /// The job (an existing one when the idempotency key named it).
    pub job_id: Uuid,
    /// False when the idempotency key named an existing job: nothing was written.
    pub created: bool,
    /// The position of its JobEnqueued (the default when nothing was written).
    pub token: ConsistencyToken,
}

/// Checks `request` (bounds, the kind and what its handler needs) without writing anything.
///
/// # Errors
/// VALIDATION_FAILED naming the field.
pub fn check_request(request: &EnqueueJob, settings: &JobsSettings) -> Result<JobRequest, ApiError> {
    use cairn_domain::JobError as E;
    let priority = match request.priority {
        None => None,
        Some(p) => Some(i16::try_from(p).map_err(|_| ApiError::field("priority", E::BadPriority.to_string()))?),
    };
    let max_attempts = match request.max_attempts {
        None => None,
        Some(n) => Some(i32::try_from(n).map_err(|_| ApiError::field("max_attempts", E::BadMaxAttempts.to_string()))?),
    };
    let checked = JobRequest::new(
        Uuid::now_v7(),
        &request.kind,
        request.args.clone(),
        request.run_at,
        priority,
        max_attempts,
        request.idempotency_key.clone(),
    )
    .map_err(|e| {
        let field = match e {
            E::BadKind | E::AlreadyEnqueued => "kind",
            E::BadArgs => "args",
            E::BadMaxAttempts => "max_attempts",
            E::BadPriority => "priority",
            E::BadIdempotencyKey => "idempotency_key",
        };
        ApiError::field(field, e.to_string())
    })?;
    jobs::kinds::validate(&checked.kind, &checked.args, settings)
        .map_err(|problem| ApiError::field(jobs::kinds::field_of(&problem), problem))?;
    Ok(checked)
}

/// The current transaction's position for a consistency token.
async fn position(conn: &mut PgConnection, global_position: i64) -> Result<ConsistencyToken, sqlx::Error> {
    let tx: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint").fetch_one(&mut *conn).await?;
    Ok(cairn_platform::rooms::position(tx, global_position))
}

fn payload<T: serde::Serialize>(event: &T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(event).map_err(|e| ApiError::Internal(e.into()))
}

/// Enqueues `request` (checked by [`check_request`]) for `enqueued_by`: the job and, when it is
/// new, its JobEnqueued (sequence 1) commit together. The same idempotency key gives the same
/// job and no second event.
///
/// # Errors
/// 503 when Postgres is down.
pub async fn enqueue(
    pool: &PgPool,
    request: JobRequest,
    enqueued_by: &str,
    metadata: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<EnqueueOutcome, ApiError> {
    let job = NewJob {
        id: request.job_id,
        kind: request.kind.clone(),
        args: request.args.clone(),
        run_at: request.run_at,
        priority: request.priority,
        max_attempts: request.max_attempts,
        idempotency_key: request.idempotency_key.clone(),
        enqueued_by: Some(enqueued_by.to_owned()),
    };
    let mut tx = pool.begin().await?;
    let enqueued = jobs::enqueue(&mut tx, &job, now).await?;
    if !enqueued.created {
        tx.rollback().await?;
        return Ok(EnqueueOutcome { job_id: enqueued.id, created: false, token: ConsistencyToken::default() });
    }
    let event = JobEvent::JobEnqueued(request);
    let at = jobs::append_event(
        &mut tx,
        &RawEvent {
            aggregate_type: "Job",
            aggregate_id: enqueued.id.to_string(),
            sequence: 1,
            event_type: "JobEnqueued",
            event_version: "1",
            payload: payload(&event)?,
            metadata,
        },
    )
    .await?;
    sqlx::query("UPDATE jobs SET version = 1 WHERE id = $1").bind(enqueued.id).execute(&mut *tx).await?;
    let token = position(&mut tx, at).await?;
    tx.commit().await?;
    metrics::counter!("cairn_commands_total", "aggregate" => "Job").increment(1);
    Ok(EnqueueOutcome { job_id: enqueued.id, created: true, token })
}

/// Why a job command found nothing to change: 404, or 409 naming the status.
async fn refusal(conn: &mut PgConnection, id: Uuid, wanted: &str) -> Result<ApiError, ApiError> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1").bind(id).fetch_optional(&mut *conn).await?;
    Ok(match status {
        None => ApiError::NotFound(format!("no job {id}")),
        Some(status) => ApiError::ConflictWith {
            message: format!("the job is {status}; {wanted}"),
            details: BTreeMap::from([("status".to_owned(), status)]),
        },
    })
}

/// Appends the `Job` event at `sequence` and commits, answering with its position.
async fn commit_job_event(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    id: Uuid,
    sequence: i64,
    event: &JobEvent,
    metadata: serde_json::Value,
) -> Result<ConsistencyToken, ApiError> {
    use cqrs_es::DomainEvent as _;
    let event_type = event.event_type();
    let at = jobs::append_event(
        &mut tx,
        &RawEvent {
            aggregate_type: "Job",
            aggregate_id: id.to_string(),
            sequence,
            event_type: &event_type,
            event_version: "1",
            payload: payload(event)?,
            metadata,
        },
    )
    .await?;
    let token = position(&mut tx, at).await?;
    tx.commit().await?;
    metrics::counter!("cairn_commands_total", "aggregate" => "Job").increment(1);
    Ok(token)
}

/// Runs a dead or failed job again (JobRetried): queued now, its attempts back to 0, its past
/// errors kept.
///
/// # Errors
/// NOT_FOUND; CONFLICT with `details.status` when the job is neither dead nor failed.
pub async fn retry(
    pool: &PgPool,
    id: Uuid,
    metadata: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<ConsistencyToken, ApiError> {
    let mut tx = pool.begin().await?;
    let version: Option<i64> = sqlx::query_scalar(
        "UPDATE jobs SET status = 'queued', attempts = 0, run_at = $2, updated_at = $2, finished_at = NULL, \
           started_at = NULL, lease_owner = NULL, lease_expires_at = NULL, version = version + 1 \
         WHERE id = $1 AND status IN ('dead', 'failed') RETURNING version",
    )
    .bind(id)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(version) = version else {
        return Err(refusal(&mut tx, id, "only a dead or failed job can be retried").await?);
    };
    commit_job_event(tx, id, version, &JobEvent::JobRetried { job_id: id }, metadata).await
}

/// Cancels a job that has not started (JobCancelled).
///
/// # Errors
/// NOT_FOUND; CONFLICT with `details.status` when the job is neither queued nor scheduled.
pub async fn cancel(
    pool: &PgPool,
    id: Uuid,
    metadata: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<ConsistencyToken, ApiError> {
    let mut tx = pool.begin().await?;
    let version: Option<i64> = sqlx::query_scalar(
        "UPDATE jobs SET status = 'cancelled', finished_at = $2, updated_at = $2, version = version + 1 \
         WHERE id = $1 AND status IN ('queued', 'scheduled') RETURNING version",
    )
    .bind(id)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(version) = version else {
        return Err(refusal(&mut tx, id, "only a queued or scheduled job can be cancelled").await?);
    };
    commit_job_event(tx, id, version, &JobEvent::JobCancelled { job_id: id }, metadata).await
}

/// A schedule as defined over the API.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefineSchedule {
    /// Unique name: lower-case letters, digits, `.`, `_`, `-`, starting with a letter or digit.
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,99}$", example = "nightly-report")]
    pub name: String,
    /// Six fields (`sec min hour day month weekday`) or five (seconds 0).
    #[schema(example = "0 0 3 * * *", max_length = 200)]
    pub cron: String,
    /// The job kind each tick enqueues.
    #[schema(example = "noop")]
    pub kind: String,
    /// The job's arguments: a JSON object.
    #[schema(value_type = Object)]
    pub args: serde_json::Value,
    /// An IANA time zone whose wall clock the ticks follow (default `UTC`).
    #[schema(example = "Europe/Paris")]
    pub timezone: Option<String>,
}

/// The aggregate's last sequence in the log (a name can be defined again after a removal).
async fn schedule_sequence(conn: &mut PgConnection, name: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE(MAX(sequence), 0) FROM events WHERE aggregate_type = 'Schedule' AND aggregate_id = $1",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await
}

fn configured(name: &str, source: &str) -> ApiError {
    ApiError::ConflictWith {
        message: format!(
            "schedule '{name}' is defined by configuration ({source}); change it in CAIRN_SCHEDULES_FILE instead"
        ),
        details: BTreeMap::from([("source".to_owned(), source.to_owned())]),
    }
}

fn unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Defines or redefines a schedule (ScheduleDefined, source `api`). The same definition again
/// records nothing. Returns whether it was new, and the token (the default when nothing changed).
///
/// # Errors
/// VALIDATION_FAILED naming the field (the cron expression, the zone, the kind, the arguments);
/// CONFLICT when configuration defines that name, or on a concurrent definition.
pub async fn define_schedule(
    pool: &PgPool,
    settings: &JobsSettings,
    body: DefineSchedule,
    metadata: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<(bool, ConsistencyToken), ApiError> {
    let spec = ScheduleSpec {
        name: body.name,
        cron: body.cron,
        timezone: body.timezone.unwrap_or_else(|| "UTC".to_owned()),
        kind: body.kind,
        args: body.args,
    };
    spec.check().map_err(|e| {
        let field = match e {
            cairn_domain::ScheduleError::BadName | cairn_domain::ScheduleError::NotFound => "name",
            cairn_domain::ScheduleError::BadKind => "kind",
            cairn_domain::ScheduleError::BadArgs => "args",
        };
        ApiError::field(field, e.to_string())
    })?;
    let def = ScheduleDef {
        name: spec.name.clone(),
        cron: spec.cron.clone(),
        timezone: spec.timezone.clone(),
        kind: spec.kind.clone(),
        args: spec.args.clone(),
    };
    let parsed = schedule::check(&def, settings).map_err(|e| ApiError::field(e.field, e.problem))?;
    let mut tx = pool.begin().await?;
    let current: Option<(String, String, String, String, serde_json::Value)> =
        sqlx::query_as("SELECT source, cron, timezone, kind, args FROM schedules WHERE name = $1 FOR UPDATE")
            .bind(&def.name)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((source, cron, timezone, kind, args)) = &current {
        if source != "api" {
            return Err(configured(&def.name, source));
        }
        if *cron == def.cron && *timezone == def.timezone && *kind == def.kind && *args == def.args {
            return Ok((false, ConsistencyToken::default()));
        }
    }
    let sequence = schedule_sequence(&mut tx, &def.name).await? + 1;
    schedule::upsert(&mut tx, &def, &parsed, Source::Api, sequence, now).await?;
    let at = jobs::append_event(
        &mut tx,
        &RawEvent {
            aggregate_type: "Schedule",
            aggregate_id: def.name.clone(),
            sequence,
            event_type: "ScheduleDefined",
            event_version: "1",
            payload: payload(&ScheduleEvent::ScheduleDefined(spec))?,
            metadata,
        },
    )
    .await;
    let at = match at {
        Ok(at) => at,
        Err(e) if unique_violation(&e) => {
            return Err(ApiError::Conflict("the schedule was defined concurrently; retry".to_owned()))
        }
        Err(e) => return Err(e.into()),
    };
    let token = position(&mut tx, at).await?;
    match tx.commit().await {
        Ok(()) => {}
        Err(e) if unique_violation(&e) => {
            return Err(ApiError::Conflict("the schedule was defined concurrently; retry".to_owned()))
        }
        Err(e) => return Err(e.into()),
    }
    metrics::counter!("cairn_commands_total", "aggregate" => "Schedule").increment(1);
    Ok((current.is_none(), token))
}

/// Removes a schedule defined over the API (ScheduleRemoved): no more ticks.
///
/// # Errors
/// NOT_FOUND; CONFLICT when configuration or cairn itself defines it.
pub async fn remove_schedule(
    pool: &PgPool,
    name: &str,
    metadata: serde_json::Value,
) -> Result<ConsistencyToken, ApiError> {
    let mut tx = pool.begin().await?;
    let source: Option<String> = sqlx::query_scalar("SELECT source FROM schedules WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    match source.as_deref() {
        None => return Err(ApiError::NotFound(format!("no schedule named '{name}'"))),
        Some("api") => {}
        Some(other) => return Err(configured(name, other)),
    }
    sqlx::query("DELETE FROM schedules WHERE name = $1").bind(name).execute(&mut *tx).await?;
    let sequence = schedule_sequence(&mut tx, name).await? + 1;
    let at = jobs::append_event(
        &mut tx,
        &RawEvent {
            aggregate_type: "Schedule",
            aggregate_id: name.to_owned(),
            sequence,
            event_type: "ScheduleRemoved",
            event_version: "1",
            payload: payload(&ScheduleEvent::ScheduleRemoved { name: name.to_owned() })?,
            metadata,
        },
    )
    .await?;
    let token = position(&mut tx, at).await?;
    tx.commit().await?;
    metrics::counter!("cairn_commands_total", "aggregate" => "Schedule").increment(1);
    Ok(token)
}

/// The metadata of a command, as the log stores it.
#[must_use]
pub fn metadata(ctx: &cairn_platform::http::RequestContext, actor: Option<&str>) -> serde_json::Value {
    serde_json::to_value(ctx.command_metadata(actor)).unwrap_or_else(|_| serde_json::json!({}))
}
