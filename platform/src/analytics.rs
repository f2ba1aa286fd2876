//! DAU, WAU and MAU as of a day, computed from `analytics_active` or taken from the rollup.
//!
//! The `analytics.rollup` job stores the figures of finished days in `analytics_rollup`; the
//! summary reads a stored row only while it is still current and computes the figures itself
//! otherwise, so its answer never depends on whether the job ran. Both go through this module so
//! they count the same way.

use chrono::{Days, NaiveDate};
use sqlx::PgConnection;

/// Days a week counts, the day itself included.
pub const WEEK_DAYS: u64 = 7;
/// Days a month counts, the day itself included.
pub const MONTH_DAYS: u64 = 30;

/// Distinct active users as of a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ActiveWindow {
    /// Active that day.
    pub dau: i64,
    /// Active on any of the 7 days ending that day.
    pub wau: i64,
    /// Active on any of the 30 days ending that day.
    pub mau: i64,
    /// The sum of the daily `active_users` over the 30 days: a stored row whose sum differs has
    /// missed a user added since.
    pub window_active: i64,
}

/// The first day of the month window ending on `day`.
#[must_use]
pub fn month_start(day: NaiveDate) -> NaiveDate {
    day.checked_sub_days(Days::new(MONTH_DAYS - 1)).unwrap_or(NaiveDate::MIN)
}

fn week_start(day: NaiveDate) -> NaiveDate {
    day.checked_sub_days(Days::new(WEEK_DAYS - 1)).unwrap_or(NaiveDate::MIN)
}

/// Counts the window ending on `day` from `analytics_active`, in one statement (one snapshot, so
/// the counts and `window_active` agree).
///
/// # Errors
/// When Postgres fails.
pub async fn compute(conn: &mut PgConnection, day: NaiveDate) -> sqlx::Result<ActiveWindow> {
    let (dau, wau, mau, window_active): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT user_id) FILTER (WHERE day = $1), \
                count(DISTINCT user_id) FILTER (WHERE day >= $2), \
                count(DISTINCT user_id), \
                (SELECT coalesce(sum(active_users), 0)::bigint FROM analytics_daily WHERE day BETWEEN $3 AND $1) \
         FROM analytics_active WHERE day BETWEEN $3 AND $1",
    )
    .bind(day)
    .bind(week_start(day))
    .bind(month_start(day))
    .fetch_one(&mut *conn)
    .await?;
    Ok(ActiveWindow { dau, wau, mau, window_active })
}

/// The stored figures for `day` if the rollup has a current row for it.
///
/// # Errors
/// When Postgres fails.
pub async fn stored(conn: &mut PgConnection, day: NaiveDate) -> sqlx::Result<Option<ActiveWindow>> {
    let row: Option<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT r.dau, r.wau, r.mau, r.window_active FROM analytics_rollup r \
         WHERE r.day = $1 \
           AND r.window_active = (SELECT coalesce(sum(active_users), 0)::bigint FROM analytics_daily \
                                  WHERE day BETWEEN $2 AND $1)",
    )
    .bind(day)
    .bind(month_start(day))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(dau, wau, mau, window_active)| ActiveWindow { dau, wau, mau, window_active }))
}

/// The figures as of `day`: the rollup's when current, counted now otherwise.
///
/// # Errors
/// When Postgres fails.
pub async fn as_of(conn: &mut PgConnection, day: NaiveDate) -> sqlx::Result<ActiveWindow> {
    match stored(conn, day).await? {
        Some(window) => Ok(window),
        None => compute(conn, day).await,
    }
}
