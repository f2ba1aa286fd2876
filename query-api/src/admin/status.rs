//! Each projection's health, computed from its checkpoint and the events table, and the parked
//! events of any consumer.

use std::sync::Arc;

use cairn_platform::envelope::ConsistencyToken;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

/// The consumers this deployment runs, by kind.
#[derive(Debug, Clone, Default)]
pub struct Consumers {
    /// Projections (checkpointed read models).
    pub projections: Arc<Vec<&'static str>>,
    /// Workers and other consumers that park (audit, email, the session map).
    pub workers: Arc<Vec<&'static str>>,
}

impl Consumers {
    /// Whether `name` is one of them.
    #[must_use]
    pub fn knows(&self, name: &str) -> bool {
        self.projections.contains(&name) || self.workers.contains(&name)
    }
}

pub use cairn_platform::checkpoint::LAG_COUNT_CAP;

/// How long a projection may stay behind without moving before it is called stalled.
pub const STALLED_AFTER_SECS: i64 = 30;

/// One projection's health.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProjectionStatus {
    /// Its name.
    pub name: String,
    /// Position applied up to, as a consistency token (`<tx>.<pos>`); `0.0` before the first event.
    pub checkpoint: String,
    /// When the checkpoint last moved.
    pub checkpoint_updated_at: Option<DateTime<Utc>>,
    /// Committed events past the checkpoint (counted up to [`LAG_COUNT_CAP`]).
    pub lag_events: i64,
    /// Age of the oldest committed event past the checkpoint, in milliseconds (0 when caught up).
    pub lag_ms: i64,
    /// `rebuilding` (a rebuild runs), `live` (caught up), `catching_up`, or `stalled` (behind and
    /// not moving for 30 s).
    pub state: &'static str,
    /// Events it parked and nobody has resolved or skipped yet.
    pub parked: i64,
    /// The rebuild running, or the last one (absent when it was never rebuilt).
    pub rebuild: Option<RebuildStatus>,
}

/// A projection's rebuild: progress while it runs, the outcome once it ended.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RebuildStatus {
    /// `running`, `done`, `failed`, or `abandoned` (marked running, but its process stopped
    /// reporting: the next rebuild takes it over).
    pub state: &'static str,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last reported progress.
    pub heartbeat_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Events read and applied so far.
    pub events_done: i64,
    /// Events in the log when it started, plus those it caught up with.
    pub events_total: i64,
    /// Events per second since it started.
    pub rate_per_sec: f64,
    /// Seconds left at that rate, while it runs.
    pub eta_secs: Option<i64>,
    /// Who started it: a user id, or `cli`.
    pub requested_by: String,
    /// Why it failed.
    pub error: Option<String>,
}

impl RebuildStatus {
    /// The figures of `row`, as of `now`.
    #[must_use]
    pub fn of(row: &cairn_projector::rebuild::RebuildRow, now: DateTime<Utc>) -> Self {
        let stale = (now - row.heartbeat_at).num_seconds() >= cairn_projector::rebuild::STALE_AFTER_SECS;
        let state = match row.state.as_str() {
            "running" if stale => "abandoned",
            "running" => "running",
            "done" => "done",
            _ => "failed",
        };
        let until = row.finished_at.unwrap_or(if state == "running" { now } else { row.heartbeat_at });
        let seconds = (until - row.started_at).num_milliseconds().max(1) as f64 / 1000.0;
        let rate_per_sec = (row.events_done as f64 / seconds * 10.0).round() / 10.0;
        let left = (row.events_total - row.events_done).max(0);
        let eta_secs = (state == "running" && rate_per_sec > 0.0).then(|| (left as f64 / rate_per_sec).ceil() as i64);
        Self {
            state,
            started_at: row.started_at,
            heartbeat_at: row.heartbeat_at,
            finished_at: row.finished_at,
            events_done: row.events_done,
            events_total: row.events_total,
            rate_per_sec,
            eta_secs,
            requested_by: row.requested_by.clone(),
            error: row.error.clone(),
        }
    }
}

/// A worker's parked count.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkerStatus {
    /// Its name.
    pub name: String,
    /// Events it parked and nobody has resolved or skipped yet.
    pub parked: i64,
}

/// The health of every projection in `names`.
///
/// # Errors
/// When a query fails.
pub async fn projections(pool: &PgPool, names: &[&str]) -> sqlx::Result<Vec<ProjectionStatus>> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let row: Option<(i64, i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT last_tx::text::bigint, last_pos, updated_at FROM projection_checkpoints WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(pool)
        .await?;
        let (tx, pos, updated_at) = row.map_or((0, 0, None), |(tx, pos, at)| (tx, pos, Some(at)));
        let at = ConsistencyToken { tx: u64::try_from(tx).unwrap_or(0), pos };
        // Both served by the (transaction_id, global_position) index: the ORDER BY keeps the
        // count's generic plan (a prepared statement's) on it instead of a scan of the whole log.
        let (lag_events, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM events \
                      WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
                      ORDER BY transaction_id, global_position LIMIT $3) pending), \
                    (SELECT recorded_at FROM events WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
                      ORDER BY transaction_id, global_position LIMIT 1)",
        )
        .bind(at.tx.to_string())
        .bind(at.pos)
        .bind(LAG_COUNT_CAP)
        .fetch_one(pool)
        .await?;
        let now = Utc::now();
        let lag_ms = oldest.map_or(0, |t| (now - t).num_milliseconds().max(0));
        let still = updated_at.is_none_or(|t| (now - t).num_seconds() >= STALLED_AFTER_SECS);
        let rebuild = cairn_projector::rebuild::latest(pool, name).await?.map(|row| RebuildStatus::of(&row, now));
        let state = if rebuild.as_ref().is_some_and(|r| r.state == "running") {
            "rebuilding"
        } else if lag_events == 0 {
            "live"
        } else if still && lag_ms >= STALLED_AFTER_SECS * 1000 {
            "stalled"
        } else {
            "catching_up"
        };
        out.push(ProjectionStatus {
            name: (*name).to_owned(),
            checkpoint: at.to_string(),
            checkpoint_updated_at: updated_at,
            lag_events,
            lag_ms,
            state,
            parked: parked_count(pool, name).await?,
            rebuild,
        });
    }
    Ok(out)
}

/// The parked counts of every worker in `names`.
///
/// # Errors
/// When a query fails.
pub async fn workers(pool: &PgPool, names: &[&str]) -> sqlx::Result<Vec<WorkerStatus>> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        out.push(WorkerStatus { name: (*name).to_owned(), parked: parked_count(pool, name).await? });
    }
    Ok(out)
}

async fn parked_count(pool: &PgPool, consumer: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM parked_events WHERE consumer = $1 AND status = 'parked'")
        .bind(consumer)
        .fetch_one(pool)
        .await
}

/// One parked event.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct ParkedRow {
    /// The event.
    pub event_id: Uuid,
    /// Its position in the log, as a consistency token.
    pub position: String,
    /// Its aggregate.
    pub aggregate_type: String,
    /// Its aggregate's id.
    pub aggregate_id: String,
    /// Its type.
    pub event_type: String,
    /// The version it was stored under.
    pub event_version: String,
    /// Why it could not be applied (the latest attempt).
    pub error: String,
    /// How often it was parked (first time and failed retries).
    pub attempts: i32,
    /// `parked`, `resolved` (applied on retry) or `skipped`.
    pub status: String,
    /// When it was first parked.
    pub parked_at: DateTime<Utc>,
    /// When its row last changed.
    pub updated_at: DateTime<Utc>,
}

/// Parked events of `consumer` with `status` (any when `None`), in log order after `after`,
/// at most `limit`; and whether more follow.
///
/// # Errors
/// When the query fails.
pub async fn parked(
    pool: &PgPool,
    consumer: &str,
    status: Option<&str>,
    after: Option<ConsistencyToken>,
    limit: i64,
) -> sqlx::Result<(Vec<ParkedRow>, bool)> {
    let after = after.unwrap_or_default();
    let mut rows: Vec<ParkedRow> = sqlx::query_as(
        "SELECT event_id, transaction_id::text || '.' || global_position AS position, aggregate_type, aggregate_id, \
                event_type, event_version, error, attempts, status, parked_at, updated_at \
         FROM parked_events \
         WHERE consumer = $1 AND ($2::text IS NULL OR status = $2) \
           AND (transaction_id, global_position) > ($3::text::xid8, $4) \
         ORDER BY transaction_id, global_position LIMIT $5",
    )
    .bind(consumer)
    .bind(status)
    .bind(after.tx.to_string())
    .bind(after.pos)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    Ok((rows, more))
}
