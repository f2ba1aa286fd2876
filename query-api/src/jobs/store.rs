//! SQL over the `jobs` and `schedules` tables.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::users::Cursor;

/// One attempt that failed.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AttemptError {
    /// The attempt, from 1.
    pub attempt: i64,
    /// When it failed.
    pub at: DateTime<Utc>,
    /// What went wrong.
    pub error: String,
}

/// A job as operators see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobView {
    /// Id (handed to the handler, for idempotent effects).
    pub id: Uuid,
    /// Kind.
    pub kind: String,
    /// The handler's arguments.
    #[schema(value_type = Object)]
    pub args: serde_json::Value,
    /// `scheduled` (waiting for `run_at`), `queued` (due), `running`, `done`, `failed`, `dead`
    /// or `cancelled`.
    #[schema(pattern = "^(scheduled|queued|running|done|failed|dead|cancelled)$")]
    pub status: String,
    /// Higher runs first.
    pub priority: i16,
    /// Attempts made (back to 0 when an operator retries it).
    pub attempts: i32,
    /// Attempts before it is dead.
    pub max_attempts: i32,
    /// When it runs next: its first run, or the retry after a backoff.
    pub run_at: DateTime<Utc>,
    /// Every failed attempt's error, oldest first (the last 50).
    pub errors: Vec<AttemptError>,
    /// The latest error.
    pub last_error: Option<String>,
    /// Who asked: a user id, `schedule:<name>`, `event:<type>`, `operator` or `system`.
    pub enqueued_by: Option<String>,
    /// Its idempotency key.
    pub idempotency_key: Option<String>,
    /// Enqueued at.
    pub created_at: DateTime<Utc>,
    /// The latest attempt started at.
    pub started_at: Option<DateTime<Utc>>,
    /// Ended at (done, failed, dead or cancelled).
    pub finished_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// While running: the worker holding its lease.
    pub lease_owner: Option<String>,
    /// While running: when the lease runs out unless renewed.
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// A `jobs` row as read.
#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    kind: String,
    args: serde_json::Value,
    status: String,
    priority: i16,
    attempts: i32,
    max_attempts: i32,
    run_at: DateTime<Utc>,
    errors: serde_json::Value,
    last_error: Option<String>,
    enqueued_by: Option<String>,
    idempotency_key: Option<String>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    lease_owner: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
}

const JOB_COLUMNS: &str = "id, kind, args, status, priority, attempts, max_attempts, run_at, errors, last_error, \
     enqueued_by, idempotency_key, created_at, started_at, finished_at, updated_at, lease_owner, lease_expires_at";

/// The row as shown at `now`: a scheduled job whose time has come is queued (it waits only for
/// a worker), and the lease is shown only while the job runs.
fn view(row: JobRow, now: DateTime<Utc>) -> JobView {
    let status = if row.status == "scheduled" && row.run_at <= now { "queued".to_owned() } else { row.status };
    let running = status == "running";
    JobView {
        id: row.id,
        kind: row.kind,
        args: row.args,
        priority: row.priority,
        attempts: row.attempts,
        max_attempts: row.max_attempts,
        run_at: row.run_at,
        errors: serde_json::from_value(row.errors).unwrap_or_default(),
        last_error: row.last_error,
        enqueued_by: row.enqueued_by,
        idempotency_key: row.idempotency_key,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        updated_at: row.updated_at,
        lease_owner: if running { row.lease_owner } else { None },
        lease_expires_at: if running { row.lease_expires_at } else { None },
        status,
    }
}

/// One job.
///
/// # Errors
/// When the query fails.
pub async fn find(pool: &PgPool, id: Uuid, now: DateTime<Utc>) -> sqlx::Result<Option<JobView>> {
    let row: Option<JobRow> =
        sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")).bind(id).fetch_optional(pool).await?;
    Ok(row.map(|r| view(r, now)))
}

/// Filters of a job list.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// As shown: `queued` includes scheduled jobs whose time has come, `scheduled` excludes them.
    pub status: Option<cairn_platform::jobs::JobStatus>,
    /// This kind only.
    pub kind: Option<String>,
}

/// A page of jobs, newest first, and the cursor of the next page.
///
/// # Errors
/// When the query fails.
pub async fn list(
    pool: &PgPool,
    filter: &JobFilter,
    after: Option<Cursor>,
    limit: i64,
    now: DateTime<Utc>,
) -> sqlx::Result<(Vec<JobView>, Option<Cursor>)> {
    use cairn_platform::jobs::JobStatus;
    // What the status filter matches, as shown at `now`.
    let status_clause = match filter.status {
        None => "TRUE".to_owned(),
        Some(JobStatus::Queued) => "(status = 'queued' OR (status = 'scheduled' AND run_at <= $5))".to_owned(),
        Some(JobStatus::Scheduled) => "(status = 'scheduled' AND run_at > $5)".to_owned(),
        Some(other) => format!("status = '{}'", other.as_str()),
    };
    let rows: Vec<JobRow> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs \
         WHERE {status_clause} AND ($1::text IS NULL OR kind = $1) \
           AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3)) \
           AND $5::timestamptz IS NOT NULL \
         ORDER BY created_at DESC, id DESC LIMIT $4"
    ))
    .bind(&filter.kind)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(limit + 1)
    .bind(now)
    .fetch_all(pool)
    .await?;
    let mut items: Vec<JobView> = rows.into_iter().map(|r| view(r, now)).collect();
    let next = if items.len() as i64 > limit {
        items.truncate(usize::try_from(limit).unwrap_or(0));
        items.last().map(|j| Cursor { created_at: j.created_at, id: j.id })
    } else {
        None
    };
    Ok((items, next))
}

/// A schedule as operators see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ScheduleView {
    /// Unique name.
    pub name: String,
    /// Cron expression (six fields with seconds, or five).
    pub cron: String,
    /// The IANA zone whose wall clock the ticks follow.
    pub timezone: String,
    /// The kind each tick enqueues.
    pub kind: String,
    /// The job's arguments.
    #[schema(value_type = Object)]
    pub args: serde_json::Value,
    /// `api`, `config` (CAIRN_SCHEDULES_FILE) or `builtin`.
    #[schema(pattern = "^(api|config|builtin)$")]
    pub source: String,
    /// The next tick.
    pub next_run_at: DateTime<Utc>,
    /// The last tick fired.
    pub last_fired_at: Option<DateTime<Utc>>,
    /// The job the last tick enqueued.
    pub last_job_id: Option<Uuid>,
    /// Defined at.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Encodes a schedule-list cursor (the last name shown) opaquely.
#[must_use]
pub fn encode_name_cursor(name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
}

/// Decodes [`encode_name_cursor`].
#[must_use]
pub fn decode_name_cursor(raw: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(raw).ok()?;
    String::from_utf8(bytes).ok().filter(|n| !n.is_empty() && n.len() <= 100)
}

/// A page of schedules by name, and the name to continue after.
///
/// # Errors
/// When the query fails.
pub async fn schedules(
    pool: &PgPool,
    after: Option<&str>,
    limit: i64,
) -> sqlx::Result<(Vec<ScheduleView>, Option<String>)> {
    let mut rows: Vec<ScheduleView> = sqlx::query_as(
        "SELECT name, cron, timezone, kind, args, source, next_run_at, last_fired_at, last_job_id, created_at, updated_at \
         FROM schedules WHERE ($1::text IS NULL OR name > $1) ORDER BY name LIMIT $2",
    )
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        rows.last().map(|s| s.name.clone())
    } else {
        None
    };
    Ok((rows, next))
}
