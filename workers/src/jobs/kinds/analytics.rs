//! `analytics.rollup`: stores DAU, WAU and MAU for each finished UTC day, so that a summary over
//! a long range reads one row instead of counting a month of users.
//!
//! A day is rolled up when it has no row yet or its row is no longer current (an event of that
//! day, or of the 29 before it, was projected after the row was written: the projector was
//! behind at midnight, or a rebuild is under way). Each day is one short statement to count and
//! one to store; nothing is held open between days. Running it twice changes nothing the second
//! time, and the summary never depends on whether it ran: it counts live any day whose row is
//! missing or stale.

use chrono::{DateTime, Days, NaiveDate, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::jobs::{JobContext, JobError, JobHandler};

/// The kind's name.
pub const KIND: &str = cairn_platform::jobs::kinds::ANALYTICS_ROLLUP;

/// Days looked at per statement when finding what to roll up.
const BATCH_DAYS: i64 = 100;

/// The most days one run rolls up; the next run carries on from there.
const MAX_DAYS_PER_RUN: u64 = 5_000;

/// Rolls up every finished day that needs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnalyticsRollup;

impl JobHandler for AnalyticsRollup {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        async move {
            let rolled = roll_up(&job.pool, job.clock.now(), &job.cancel).await?;
            tracing::info!(job = %job.id, days = rolled, "analytics rolled up");
            Ok(())
        }
        .boxed()
    }
}

/// Rolls up the finished days before `now`'s UTC day that have no current row, oldest first, until none
/// is left, `cancel` fires or [`MAX_DAYS_PER_RUN`] are done. Returns how many it stored.
///
/// # Errors
/// When Postgres fails.
pub async fn roll_up(pool: &PgPool, now: DateTime<Utc>, cancel: &CancellationToken) -> anyhow::Result<u64> {
    let Some(last) = now.date_naive().checked_sub_days(Days::new(1)) else { return Ok(0) };
    let mut rolled = 0u64;
    while rolled < MAX_DAYS_PER_RUN && !cancel.is_cancelled() {
        let due = due_days(pool, last).await?;
        if due.is_empty() {
            break;
        }
        for day in due {
            if cancel.is_cancelled() {
                break;
            }
            store(pool, day, now).await?;
            rolled += 1;
        }
    }
    Ok(rolled)
}

/// Up to [`BATCH_DAYS`] days from the first with any figures up to `last` whose row is missing
/// or no longer current, oldest first.
async fn due_days(pool: &PgPool, last: NaiveDate) -> sqlx::Result<Vec<NaiveDate>> {
    sqlx::query_scalar(
        "WITH span AS (SELECT g::date AS day FROM generate_series((SELECT min(day) FROM analytics_daily), $1::date, \
                                                                  interval '1 day') AS g) \
         SELECT span.day FROM span LEFT JOIN analytics_rollup r ON r.day = span.day \
         WHERE r.day IS NULL \
            OR r.window_active <> (SELECT coalesce(sum(active_users), 0)::bigint FROM analytics_daily a \
                                   WHERE a.day BETWEEN span.day - 29 AND span.day) \
         ORDER BY span.day LIMIT $2",
    )
    .bind(last)
    .bind(BATCH_DAYS)
    .fetch_all(pool)
    .await
}

/// Counts the window ending on `day` and stores it.
async fn store(pool: &PgPool, day: NaiveDate, now: DateTime<Utc>) -> sqlx::Result<()> {
    let mut conn = pool.acquire().await?;
    let window = cairn_platform::analytics::compute(&mut conn, day).await?;
    sqlx::query(
        "INSERT INTO analytics_rollup (day, dau, wau, mau, window_active, computed_at) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (day) DO UPDATE SET dau = EXCLUDED.dau, wau = EXCLUDED.wau, mau = EXCLUDED.mau, \
                                         window_active = EXCLUDED.window_active, computed_at = EXCLUDED.computed_at",
    )
    .bind(day)
    .bind(window.dau)
    .bind(window.wau)
    .bind(window.mau)
    .bind(window.window_active)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
