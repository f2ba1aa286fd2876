//! The runner's statements on the `jobs` table. Every time is the runner's clock (`now`), never
//! the database's, so tests move time with their clock. Every write to a running job is fenced:
//! it names the fence of the lease that ran it and `status = 'running'`, so a worker that lost
//! its lease (paused, partitioned, slow) changes nothing.

use std::time::Duration;

use cairn_domain::job::{JobEvent, JobOutcome};
use cairn_platform::jobs::{append_event, RawEvent};
use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The most errors kept per job, and the longest error kept, in characters.
pub const ERRORS_KEPT: usize = 50;
/// The longest error text kept with an attempt, in characters.
pub const ERROR_MAX_CHARS: usize = 2000;

/// The error recorded when a running job's lease ran out.
pub const LEASE_EXPIRED: &str = "lease expired (worker lost)";

/// Appends `{attempt, at, error}` (from `attempts`, `$now` and `$error`) to `errors`, keeping
/// the last [`ERRORS_KEPT`]. `now` and `error` are the placeholders of the statement using it.
fn errors_append(now: &str, error: &str) -> String {
    format!(
        "jsonb_path_query_array(errors || jsonb_build_array(jsonb_build_object('attempt', attempts, 'at', {now}::timestamptz, 'error', {error}::text)), \
         '$[last-{} to last]')",
        ERRORS_KEPT - 1
    )
}

/// A job a claim leased to this worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub kind: String,
    pub args: serde_json::Value,
    /// This attempt, from 1 (the claim counted it).
    pub attempts: i32,
    pub max_attempts: i32,
    /// The lease's fence: every write about this run names it.
    pub fence: i64,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Leases up to `limit` due jobs of `kind`, best priority first, then oldest `run_at`, in one
/// statement. Rows another worker is claiming are skipped, not waited for.
pub async fn claim(
    pool: &PgPool,
    kind: &str,
    limit: usize,
    owner: &str,
    now: DateTime<Utc>,
    lease: Duration,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let lease_until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
    sqlx::query_as(
        "UPDATE jobs SET status = 'running', fence = fence + 1, attempts = attempts + 1, lease_owner = $3, \
             lease_expires_at = $4, started_at = $5, updated_at = $5 \
         WHERE id IN (SELECT id FROM jobs WHERE kind = $1 AND status IN ('queued', 'scheduled') AND run_at <= $5 \
                      ORDER BY priority DESC, run_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING id, kind, args, attempts, max_attempts, fence, run_at, created_at",
    )
    .bind(kind)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .bind(owner)
    .bind(lease_until)
    .bind(now)
    .fetch_all(pool)
    .await
}

/// Renews the leases of `held` (id, fence) until `now + lease`; returns the ids still held.
pub async fn renew(
    pool: &PgPool,
    held: &[(Uuid, i64)],
    now: DateTime<Utc>,
    lease: Duration,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let lease_until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
    let (ids, fences): (Vec<Uuid>, Vec<i64>) = held.iter().copied().unzip();
    sqlx::query_scalar(
        "UPDATE jobs SET lease_expires_at = $3 \
         WHERE (id, fence) IN (SELECT * FROM unnest($1::uuid[], $2::bigint[])) AND status = 'running' \
         RETURNING id",
    )
    .bind(ids)
    .bind(fences)
    .bind(lease_until)
    .fetch_all(pool)
    .await
}

/// How one run ended, as it is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// The handler succeeded.
    Done,
    /// Failed; runs again at `run_at`.
    Retry { at: DateTime<Utc>, error: String, run_at: DateTime<Utc> },
    /// A permanent error.
    Failed { at: DateTime<Utc>, error: String },
    /// Failed with no attempt left.
    Dead { at: DateTime<Utc>, error: String },
    /// Handed back unfinished at shutdown: due at once, and this run does not count as an attempt.
    Release,
}

impl Write {
    /// The terminal outcome, for the log.
    #[must_use]
    pub fn outcome(&self) -> Option<JobOutcome> {
        match self {
            Self::Done => Some(JobOutcome::Done),
            Self::Failed { .. } => Some(JobOutcome::Failed),
            Self::Dead { .. } => Some(JobOutcome::Dead),
            Self::Retry { .. } | Self::Release => None,
        }
    }

    /// The `outcome` label of `cairn_jobs_finished_total`.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retry { .. } => "retry",
            Self::Failed { .. } => "failed",
            Self::Dead { .. } => "dead",
            Self::Release => "released",
        }
    }
}

/// Cuts an error to [`ERROR_MAX_CHARS`] characters.
#[must_use]
pub fn clip(error: &str) -> String {
    error.chars().take(ERROR_MAX_CHARS).collect()
}

/// Writes how the run of `id` under `fence` ended, in `conn`'s transaction, with its
/// `JobFinished` when it is terminal. False when the lease was lost: nothing was written.
pub async fn record(
    conn: &mut PgConnection,
    id: Uuid,
    fence: i64,
    write: &Write,
    now: DateTime<Utc>,
    metadata: &serde_json::Value,
) -> Result<bool, sqlx::Error> {
    const FENCED: &str = "WHERE id = $1 AND fence = $2 AND status = 'running'";
    let row: Option<(String, i32, i64)> = match write {
        Write::Done => {
            sqlx::query_as(&format!(
                "UPDATE jobs SET status = 'done', finished_at = $3, updated_at = $3, lease_owner = NULL, \
                     lease_expires_at = NULL, version = version + 1 {FENCED} RETURNING kind, attempts, version"
            ))
            .bind(id)
            .bind(fence)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?
        }
        Write::Release => {
            sqlx::query_as(&format!(
                "UPDATE jobs SET status = 'queued', run_at = $3, updated_at = $3, attempts = greatest(attempts - 1, 0), \
                     lease_owner = NULL, lease_expires_at = NULL {FENCED} RETURNING kind, attempts, version"
            ))
            .bind(id)
            .bind(fence)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?
        }
        Write::Retry { at, error, run_at } => failure(conn, id, fence, "scheduled", *at, error, Some(*run_at), now).await?,
        Write::Failed { at, error } => failure(conn, id, fence, "failed", *at, error, None, now).await?,
        Write::Dead { at, error } => failure(conn, id, fence, "dead", *at, error, None, now).await?,
    };
    let Some((kind, attempts, version)) = row else { return Ok(false) };
    if let Some(outcome) = write.outcome() {
        finished(conn, id, &kind, outcome, attempts, version, now, metadata).await?;
    }
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
async fn failure(
    conn: &mut PgConnection,
    id: Uuid,
    fence: i64,
    status: &str,
    at: DateTime<Utc>,
    error: &str,
    run_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<Option<(String, i32, i64)>, sqlx::Error> {
    let terminal = run_at.is_none();
    sqlx::query_as(&format!(
        "UPDATE jobs SET status = $3, run_at = coalesce($6, run_at), finished_at = $7, version = version + $8, \
             errors = {}, last_error = $5, lease_owner = NULL, lease_expires_at = NULL, updated_at = $9 \
         WHERE id = $1 AND fence = $2 AND status = 'running' RETURNING kind, attempts, version",
        errors_append("$4", "$5")
    ))
    .bind(id)
    .bind(fence)
    .bind(status)
    .bind(at)
    .bind(clip(error))
    .bind(run_at)
    .bind(terminal.then_some(now))
    .bind(i64::from(terminal))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await
}

/// Appends `JobFinished` at `version` (the row's version, already moved on).
#[allow(clippy::too_many_arguments)]
async fn finished(
    conn: &mut PgConnection,
    id: Uuid,
    kind: &str,
    outcome: JobOutcome,
    attempts: i32,
    version: i64,
    now: DateTime<Utc>,
    metadata: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    let event = JobEvent::JobFinished { job_id: id, kind: kind.to_owned(), outcome, attempts, finished_at: now };
    let payload = serde_json::to_value(&event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let (event_type, event_version) = (event.event_type(), event.event_version());
    append_event(
        conn,
        &RawEvent {
            aggregate_type: "Job",
            aggregate_id: id.to_string(),
            sequence: version,
            event_type: &event_type,
            event_version: &event_version,
            payload,
            metadata: metadata.clone(),
        },
    )
    .await?;
    Ok(())
}

/// Frees up to 100 running jobs whose lease ran out before `now` (their worker died or stalled):
/// queued again at once, or dead (with its `JobFinished`) if that was the last attempt. The run
/// that was lost counts as an attempt, with [`LEASE_EXPIRED`] as its error. Returns each one's
/// kind and whether it is dead.
pub async fn reap(pool: &PgPool, now: DateTime<Utc>, metadata: &serde_json::Value) -> Result<Vec<(String, bool)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(Uuid, String, bool, i32, i64)> = sqlx::query_as(&format!(
        "WITH expired AS (SELECT id FROM jobs WHERE status = 'running' AND lease_expires_at < $1 \
                          ORDER BY lease_expires_at LIMIT 100 FOR UPDATE SKIP LOCKED) \
         UPDATE jobs j SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END, \
             run_at = $1, lease_owner = NULL, lease_expires_at = NULL, errors = {}, last_error = $2, \
             finished_at = CASE WHEN j.attempts >= j.max_attempts THEN $1 END, \
             version = j.version + CASE WHEN j.attempts >= j.max_attempts THEN 1 ELSE 0 END, updated_at = $1 \
         FROM expired WHERE j.id = expired.id \
         RETURNING j.id, j.kind, j.status = 'dead', j.attempts, j.version",
        errors_append("$1", "$2")
    ))
    .bind(now)
    .bind(LEASE_EXPIRED)
    .fetch_all(&mut *tx)
    .await?;
    for (id, kind, dead, attempts, version) in &rows {
        if *dead {
            finished(&mut tx, *id, kind, JobOutcome::Dead, *attempts, *version, now, metadata).await?;
        }
    }
    tx.commit().await?;
    Ok(rows.into_iter().map(|(_, kind, dead, _, _)| (kind, dead)).collect())
}

/// Deletes finished jobs past their retention, in batches; returns how many.
pub async fn purge(pool: &PgPool, now: DateTime<Utc>, keep_done: Duration, keep_dead: Duration) -> Result<u64, sqlx::Error> {
    let done_before = now - chrono::Duration::from_std(keep_done).unwrap_or(chrono::Duration::MAX);
    let dead_before = now - chrono::Duration::from_std(keep_dead).unwrap_or(chrono::Duration::MAX);
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE \
                 (status IN ('done', 'cancelled') AND coalesce(finished_at, updated_at) < $1) OR \
                 (status IN ('dead', 'failed') AND coalesce(finished_at, updated_at) < $2) \
             LIMIT 1000)",
        )
        .bind(done_before)
        .bind(dead_before)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < 1000 {
            return Ok(total);
        }
    }
}

/// Jobs by kind and status, for the gauges (the statuses that are not terminal, and the ones
/// an operator acts on).
pub async fn counts(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT kind, status, count(*) FROM jobs WHERE status IN ('scheduled', 'queued', 'running', 'failed', 'dead') \
         GROUP BY kind, status",
    )
    .fetch_all(pool)
    .await
}
