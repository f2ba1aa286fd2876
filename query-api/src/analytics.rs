//! `GET /api/v1/analytics/summary`: the daily figures over a range of UTC days, and DAU, WAU and
//! MAU as of its last day.

use axum::extract::State;
use cairn_platform::auth::Caller;
use cairn_platform::http::{ApiError, ApiQuery, ApiResponse, Envelope};
use chrono::{Days, NaiveDate};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::consistency::{ConsistencyRequest, ReadModel};
use crate::QueryState;

/// The days a range covers when none is given: the last 30, today included.
pub const DEFAULT_DAYS: u64 = 30;
/// The most days one summary covers.
pub const MAX_DAYS: i64 = 366;

/// The summary route.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(summary))
}

/// `GET /api/v1/analytics/summary` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SummaryQuery {
    /// First UTC day, `YYYY-MM-DD` (default: 29 days before `to`).
    #[param(value_type = Option<String>, format = Date)]
    from: Option<String>,
    /// Last UTC day, `YYYY-MM-DD` (default: today).
    #[param(value_type = Option<String>, format = Date)]
    to: Option<String>,
}

/// One UTC day's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DayFigures {
    /// The day.
    pub day: NaiveDate,
    /// Accounts opened.
    pub signups: i64,
    /// Distinct users with a sign-in or a refresh that day.
    pub active_users: i64,
    /// Messages sent.
    pub messages_sent: i64,
    /// Files uploaded.
    pub files_uploaded: i64,
    /// Their bytes.
    pub bytes_uploaded: i64,
    /// Job runs that ended (done, failed or dead).
    pub jobs_run: i64,
    /// Those of them that failed or died.
    pub jobs_failed: i64,
}

/// The figures over a range, and distinct active users as of its last day.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AnalyticsSummary {
    /// First day of the range.
    pub from: NaiveDate,
    /// Last day of the range.
    pub to: NaiveDate,
    /// One entry per day of the range, oldest first; days without activity are zeros.
    pub days: Vec<DayFigures>,
    /// Distinct users active on `to`.
    pub dau: i64,
    /// Distinct users active on any of the 7 days ending on `to`.
    pub wau: i64,
    /// Distinct users active on any of the 30 days ending on `to`.
    pub mau: i64,
}

fn parse_day(field: &str, raw: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| ApiError::field(field, "must be a date, YYYY-MM-DD"))
}

/// The range asked for, checked: defaults filled, `from` not after `to`, at most [`MAX_DAYS`].
fn range(query: &SummaryQuery, today: NaiveDate) -> Result<(NaiveDate, NaiveDate), ApiError> {
    let from = query.from.as_deref().map(|raw| parse_day("from", raw)).transpose()?;
    let to = query.to.as_deref().map(|raw| parse_day("to", raw)).transpose()?.unwrap_or(today);
    let from = match from {
        Some(from) => from,
        None => to.checked_sub_days(Days::new(DEFAULT_DAYS - 1)).unwrap_or(NaiveDate::MIN),
    };
    if from > to {
        return Err(ApiError::field("from", "must not be after to"));
    }
    if (to - from).num_days() + 1 > MAX_DAYS {
        return Err(ApiError::field("from", format!("the range covers at most {MAX_DAYS} days")));
    }
    Ok((from, to))
}

/// Each UTC day's sign-ups, active users (distinct users with a sign-in or refresh), messages
/// sent, files uploaded and their bytes, and job runs that ended (and failed), from `from` to
/// `to` included; and DAU, WAU and MAU as of `to`. Defaults to the 30 days ending today; at most
/// 366 days.
#[utoipa::path(get, path = "/api/v1/analytics/summary", tag = "analytics", security(("bearer" = [])),
    params(SummaryQuery, crate::consistency::ConsistencyHeader),
    responses((status = 200, description = "the series and the active users as of `to`", body = Envelope<AnalyticsSummary>),
              (status = 400, description = "VALIDATION_FAILED: a bad date, `from` after `to`, or more than 366 days"),
              (status = 403, description = "FORBIDDEN: the caller lacks analytics:read")))]
#[tracing::instrument(skip_all)]
async fn summary(
    State(state): State<QueryState>,
    caller: Caller,
    consistency: ConsistencyRequest,
    ApiQuery(query): ApiQuery<SummaryQuery>,
) -> Result<ApiResponse<AnalyticsSummary>, ApiError> {
    caller.require("analytics:read")?;
    let (from, to) = range(&query, state.clock.now().date_naive())?;
    let consistency = consistency.wait(&[ReadModel::Analytics]).await?;
    let mut conn = state.pool.acquire().await?;
    let days: Vec<DayFigures> = sqlx::query_as(
        "SELECT s.day::date AS day, coalesce(d.signups, 0) AS signups, coalesce(d.active_users, 0) AS active_users, \
                coalesce(d.messages_sent, 0) AS messages_sent, coalesce(d.files_uploaded, 0) AS files_uploaded, \
                coalesce(d.bytes_uploaded, 0) AS bytes_uploaded, coalesce(d.jobs_run, 0) AS jobs_run, \
                coalesce(d.jobs_failed, 0) AS jobs_failed \
         FROM generate_series($1::date, $2::date, interval '1 day') AS s(day) \
         LEFT JOIN analytics_daily d ON d.day = s.day::date ORDER BY s.day",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&mut *conn)
    .await?;
    let window = cairn_platform::analytics::as_of(&mut conn, to).await?;
    let summary = AnalyticsSummary { from, to, days, dau: window.dau, wau: window.wau, mau: window.mau };
    Ok(consistency.annotate(ApiResponse::ok(summary)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    fn query(from: Option<&str>, to: Option<&str>) -> SummaryQuery {
        SummaryQuery { from: from.map(str::to_owned), to: to.map(str::to_owned) }
    }

    #[test]
    fn the_default_range_is_the_thirty_days_ending_today() {
        assert_eq!(range(&query(None, None), day("2026-03-10")).unwrap(), (day("2026-02-09"), day("2026-03-10")));
        assert_eq!(
            range(&query(None, Some("2026-01-31")), day("2026-03-10")).unwrap(),
            (day("2026-01-02"), day("2026-01-31"))
        );
    }

    #[test]
    fn a_range_of_366_days_passes_and_one_more_is_refused() {
        let today = day("2026-03-10");
        assert!(range(&query(Some("2025-01-01"), Some("2026-01-01")), today).is_ok());
        assert!(range(&query(Some("2024-12-31"), Some("2026-01-01")), today).is_err());
        assert!(range(&query(Some("2026-01-02"), Some("2026-01-01")), today).is_err());
        assert!(range(&query(Some("2026-02-30"), None), today).is_err());
        assert!(range(&query(None, Some("yesterday")), today).is_err());
    }
}
