//! The job queue's shared half: what every service needs to enqueue a job or read one. The
//! workers (`cairn-workers`) claim and run them.
//!
//! Postgres is the queue (`jobs`, migration `0010_jobs.sql`). A job is claimed with one statement
//! that picks due rows with `FOR UPDATE SKIP LOCKED`, best priority first, and takes their
//! leases (adding one to each `fence`); workers are woken by NOTIFY on [`NOTIFY_CHANNEL`] at
//! the commit that makes a job claimable, and poll as a fallback.
//!
//! - [`enqueue`]: the typed enqueue, inside the caller's transaction.
//! - [`append_event`]: appends one event to the log in the caller's transaction, for the job
//!   and schedule commands whose state row and event must commit together.
//! - [`kinds`]: the shipped kinds and what their arguments must be.
//! - [`schedule`]: cron expressions in a time zone, the built-in schedules, the schedules file.
//! - [`settings`]: `CAIRN_JOBS_*`, `CAIRN_SCHEDULES_FILE`, `CAIRN_WEBHOOK_*`.

pub mod kinds;
pub mod schedule;
pub mod settings;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

pub use settings::{JobsSettings, PerKind};

/// The channel workers LISTEN on; the `jobs` triggers NOTIFY it.
pub const NOTIFY_CHANNEL: &str = "cairn_jobs";

/// A job's status, as the `jobs.status` column and the API have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waits for its `run_at` (a delay, or the backoff before a retry).
    Scheduled,
    /// Due; waits for a worker.
    Queued,
    /// Leased by a worker.
    Running,
    /// Succeeded.
    Done,
    /// Gave up on a permanent error.
    Failed,
    /// Every attempt failed.
    Dead,
    /// Cancelled by an operator before it ran.
    Cancelled,
}

impl JobStatus {
    /// Every status.
    pub const ALL: [Self; 7] =
        [Self::Scheduled, Self::Queued, Self::Running, Self::Done, Self::Failed, Self::Dead, Self::Cancelled];

    /// The column's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses the column's spelling.
    #[must_use]
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// A job to enqueue from code.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// The job's id (the handler is given it, so its effects can be idempotent).
    pub id: Uuid,
    /// A registered kind.
    pub kind: String,
    /// The handler's arguments (a JSON object).
    pub args: serde_json::Value,
    /// Not before; None runs it as soon as a worker is free.
    pub run_at: Option<DateTime<Utc>>,
    /// Higher runs first, -100 to 100.
    pub priority: i16,
    /// Attempts before the job is dead.
    pub max_attempts: i32,
    /// The same key returns the same job while it exists.
    pub idempotency_key: Option<String>,
    /// Who asked: a user id, `schedule:<name>`, `event:<type>`, `operator`, `system`.
    pub enqueued_by: Option<String>,
}

impl NewJob {
    /// A job of `kind` with `args`, to run at once with the defaults.
    #[must_use]
    pub fn new(kind: &str, args: serde_json::Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind: kind.to_owned(),
            args,
            run_at: None,
            priority: 0,
            max_attempts: 25,
            idempotency_key: None,
            enqueued_by: None,
        }
    }

    /// With an idempotency key.
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Naming who asked.
    #[must_use]
    pub fn enqueued_by(mut self, by: impl Into<String>) -> Self {
        self.enqueued_by = Some(by.into());
        self
    }

    /// Not before `at`.
    #[must_use]
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }
}

/// What [`enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The job: the new one, or the one that already holds the idempotency key.
    pub id: Uuid,
    /// False when the idempotency key named an existing job (nothing was written).
    pub created: bool,
}

/// Enqueues `job` in the caller's transaction (`&mut *tx`), so it commits or rolls back with
/// the caller's other writes; workers are woken when it commits. `now` is the caller's clock.
///
/// An idempotency key is decided by the unique index in the insert itself: of two concurrent
/// enqueues with one key, one inserts and the other waits for it to commit and then returns its
/// job (if the first rolls back, the second inserts).
///
/// # Errors
/// Database errors (a check constraint names a field out of bounds).
pub async fn enqueue(conn: &mut PgConnection, job: &NewJob, now: DateTime<Utc>) -> Result<Enqueued, sqlx::Error> {
    let run_at = job.run_at.unwrap_or(now).max(now);
    let status = if run_at > now { JobStatus::Scheduled } else { JobStatus::Queued };
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO jobs (id, kind, args, status, priority, max_attempts, run_at, idempotency_key, enqueued_by, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) \
         ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
    )
    .bind(job.id)
    .bind(&job.kind)
    .bind(&job.args)
    .bind(status.as_str())
    .bind(job.priority)
    .bind(job.max_attempts)
    .bind(run_at)
    .bind(&job.idempotency_key)
    .bind(&job.enqueued_by)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = inserted {
        return Ok(Enqueued { id, created: true });
    }
    // Only a key can conflict (ids are fresh): the statement above waited for its holder.
    let existing: Uuid = sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1")
        .bind(&job.idempotency_key)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Enqueued { id: existing, created: false })
}

/// One event to append with [`append_event`]: the columns postgres-es writes.
#[derive(Debug, Clone)]
pub struct RawEvent<'a> {
    /// `Job`, `Schedule`.
    pub aggregate_type: &'a str,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Its sequence (the previous one plus one).
    pub sequence: i64,
    /// The event's type (`JobEnqueued`).
    pub event_type: &'a str,
    /// The event's version (`1`).
    pub event_version: &'a str,
    /// The payload as postgres-es stores it (the serialised domain event enum).
    pub payload: serde_json::Value,
    /// The metadata as postgres-es stores it (request id, actor, …).
    pub metadata: serde_json::Value,
}

/// Appends `event` to the log in the caller's transaction and returns its global position.
/// The relay is woken by the log's own NOTIFY when it commits.
///
/// # Errors
/// Database errors; a taken sequence is a unique violation on the primary key.
pub async fn append_event(conn: &mut PgConnection, event: &RawEvent<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING global_position",
    )
    .bind(event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .bind(event.event_type)
    .bind(event.event_version)
    .bind(&event.payload)
    .bind(&event.metadata)
    .fetch_one(&mut *conn)
    .await
}
