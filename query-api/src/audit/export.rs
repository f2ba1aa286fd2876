//! `GET /api/v1/audit/events/export`: the audit list's selection, streamed as NDJSON or CSV,
//! ending with the signed head that covers it.
//!
//! The selection is bounded when the export starts by the latest signed head: only events the
//! tree of that head holds (leaf index below its size) are exported, and the head is the last
//! thing written. The body is a stream of keyset pages of [`PAGE`] events, each fetched by a
//! short query of its own: no transaction or server-side cursor stays open between pages, and
//! nothing beyond one page is held. A client that disconnects drops the body, and with it the
//! stream: no further page is fetched. A failure half-way ends the body early, without the head:
//! an export that does not end with its head is incomplete.
//!
//! Formats:
//! - `ndjson` (`application/x-ndjson`): one event per line, the object the list shows; the last
//!   line is `{"head": {…signed head…}}`.
//! - `csv` (`text/csv`, RFC 4180): a header row, one row per event (payload, metadata and the
//!   canonical text as JSON text), and last a record of two fields, `#head` and the signed head
//!   as JSON, which a reader skips as a comment (`#`) or reads as that record.
//!
//! Metric: `cairn_audit_export_rows_total` (events written into export bodies).

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use cairn_platform::audit::{store, SignedHead};
use cairn_platform::auth::Caller;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiQuery};
use chrono::SecondsFormat;
use serde::Deserialize;
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::events::{self, AuditEvent, EventFilter, Window};
use super::routes::{RawFilter, AUDIT_READ};
use crate::QueryState;

/// Events fetched per page.
pub const PAGE: i64 = 1000;

/// The export route.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(export_events))
}

/// An export's format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// One JSON object per line.
    #[default]
    Ndjson,
    /// RFC 4180 comma-separated values with a header row.
    Csv,
}

/// `GET /api/v1/audit/events/export` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    /// This aggregate type only.
    #[param(min_length = 1, max_length = 200)]
    aggregate_type: Option<String>,
    /// This aggregate only.
    #[param(min_length = 1, max_length = 200)]
    aggregate_id: Option<String>,
    /// This event type only.
    #[param(min_length = 1, max_length = 200)]
    event_type: Option<String>,
    /// Events caused by this user (`metadata.actor_id`).
    #[param(min_length = 1, max_length = 200)]
    actor_id: Option<String>,
    /// Log time at or after this (RFC 3339), as the list takes it.
    #[param(value_type = Option<String>, format = DateTime)]
    from: Option<String>,
    /// Log time before this (RFC 3339), as the list takes it.
    #[param(value_type = Option<String>, format = DateTime)]
    to: Option<String>,
    /// `ndjson` (default) or `csv`.
    #[param(inline)]
    format: Option<ExportFormat>,
}

/// The columns of a CSV export, in order.
pub const CSV_COLUMNS: [&str; 18] = [
    "position",
    "leaf_index",
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "sequence",
    "event_type",
    "event_version",
    "recorded_at",
    "actor_id",
    "client_ip",
    "user_agent",
    "request_id",
    "correlation_id",
    "causation_id",
    "payload",
    "metadata",
    "canonical",
];

/// Appends `field` to `out` as RFC 4180 wants it: quoted, inner quotes doubled, when it holds a
/// comma, a quote, a line break or a leading `#` (which a reader could take for a comment).
pub fn push_csv_field(out: &mut String, field: &str) {
    let quote = field.starts_with('#') || field.contains([',', '"', '\n', '\r']);
    if quote {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

/// Appends one record (fields, then CRLF).
pub fn push_csv_record<'a>(out: &mut String, fields: impl IntoIterator<Item = &'a str>) {
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_csv_field(out, field);
    }
    out.push_str("\r\n");
}

fn csv_row(out: &mut String, e: &AuditEvent) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let fields = [
        e.position.clone(),
        e.leaf_index.map(|i| i.to_string()).unwrap_or_default(),
        e.event_id.to_string(),
        e.aggregate_type.clone(),
        e.aggregate_id.clone(),
        e.sequence.to_string(),
        e.event_type.clone(),
        e.event_version.clone(),
        e.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        opt(&e.actor_id),
        opt(&e.client_ip),
        opt(&e.user_agent),
        opt(&e.request_id),
        opt(&e.correlation_id),
        opt(&e.causation_id),
        e.payload.to_string(),
        e.metadata.to_string(),
        e.canonical.clone(),
    ];
    push_csv_record(out, fields.iter().map(String::as_str));
}

/// The trailer: the signed head that covers the export.
fn trailer(format: ExportFormat, head: &SignedHead) -> Result<Vec<u8>, serde_json::Error> {
    Ok(match format {
        ExportFormat::Ndjson => {
            let mut line = serde_json::to_vec(&serde_json::json!({ "head": head }))?;
            line.push(b'\n');
            line
        }
        ExportFormat::Csv => {
            let mut out = String::from("#head,");
            push_csv_field(&mut out, &serde_json::to_string(head)?);
            out.push_str("\r\n");
            out.into_bytes()
        }
    })
}

/// Where a running export is.
struct Export {
    pool: PgPool,
    filter: EventFilter,
    format: ExportFormat,
    /// The last leaf under the head.
    through: ConsistencyToken,
    /// The last event written.
    after: Option<ConsistencyToken>,
    /// The head, until the trailer is written.
    head: SignedHead,
    /// Every page fetched: the trailer is next.
    pages_done: bool,
}

/// Why a stream stopped early (logged; the client sees the body cut short).
fn cut(what: &str, e: &(dyn std::error::Error + 'static)) -> std::io::Error {
    let detail = cairn_platform::http::loggable(e);
    tracing::error!(error = %detail, "audit export stopped {what}");
    std::io::Error::other(format!("audit export stopped {what}"))
}

impl Export {
    /// The next chunk of the body, or `None` once the trailer was written.
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Option<Self>)> {
        if self.pages_done {
            return Some(match trailer(self.format, &self.head) {
                Ok(bytes) => (Ok(Bytes::from(bytes)), None),
                Err(e) => (Err(cut("writing the head", &e)), None),
            });
        }
        let window = Window { after: self.after, through: Some(self.through) };
        let (items, more) = match events::page(&self.pool, &self.filter, window, PAGE).await {
            Ok(page) => page,
            Err(e) => return Some((Err(cut("reading a page", &e)), None)),
        };
        metrics::counter!("cairn_audit_export_rows_total").increment(items.len() as u64);
        let mut out = Vec::with_capacity(items.len() * 1024);
        match self.format {
            ExportFormat::Ndjson => {
                for item in &items {
                    if let Err(e) = serde_json::to_writer(&mut out, item) {
                        return Some((Err(cut("writing an event", &e)), None));
                    }
                    out.push(b'\n');
                }
            }
            ExportFormat::Csv => {
                let mut text = String::with_capacity(items.len() * 1024);
                if self.after.is_none() {
                    push_csv_record(&mut text, CSV_COLUMNS);
                }
                for item in &items {
                    csv_row(&mut text, item);
                }
                out = text.into_bytes();
            }
        }
        match items.last().and_then(AuditEvent::position) {
            Some(last) => self.after = Some(last),
            // Nothing (more) matches: the CSV header, if any, was written above.
            None => self.after = Some(self.after.unwrap_or_default()),
        }
        self.pages_done = !more;
        Some((Ok(Bytes::from(out)), Some(self)))
    }
}

/// The audit list's selection (same filters, no cursor or limit), streamed as NDJSON or CSV and
/// ending with the latest signed head, which covers every event exported (see the module
/// documentation for the formats). Needs `audit:read`.
#[utoipa::path(get, path = "/api/v1/audit/events/export", tag = "audit", security(("bearer" = [])),
    params(ExportQuery),
    responses((status = 200, description = "the events, then the signed head (NDJSON: a last line {\"head\": …}; CSV: a last record #head,<head JSON>)",
                content((String = "application/x-ndjson"), (String = "text/csv"))),
              (status = 400, description = "an unknown parameter, or a bad filter or format"),
              (status = 403, description = "lacks audit:read"),
              (status = 409, description = "no tree head signed yet: nothing can be exported with a head that covers it")))]
#[tracing::instrument(skip_all)]
async fn export_events(
    State(pool): State<PgPool>,
    caller: Caller,
    query: Result<ApiQuery<ExportQuery>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(AUDIT_READ)?;
    let ApiQuery(query) = query?;
    let format = query.format.unwrap_or_default();
    let filter = RawFilter {
        aggregate_type: query.aggregate_type,
        aggregate_id: query.aggregate_id,
        event_type: query.event_type,
        actor_id: query.actor_id,
        from: query.from,
        to: query.to,
    }
    .check()?;
    let head = store::latest_head(&pool).await?.ok_or_else(|| {
        ApiError::Conflict(
            "no tree head has been signed yet: an export ends with the head that covers it; try again shortly"
                .to_owned(),
        )
    })?;
    let last_leaf = head.tree_size.saturating_sub(1);
    let through = events::leaf_position(&pool, last_leaf).await?.ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!("the head of size {} has no leaf {last_leaf}", head.tree_size))
    })?;
    let (content_type, extension) = match format {
        ExportFormat::Ndjson => ("application/x-ndjson", "ndjson"),
        ExportFormat::Csv => ("text/csv; charset=utf-8", "csv"),
    };
    let export = Export { pool, filter, format, through, after: None, head, pages_done: false };
    let disposition = format!("attachment; filename=\"cairn-audit-{}.{extension}\"", export.head.tree_size);
    let body = Body::from_stream(futures::stream::unfold(Some(export), |state| async move { state?.next().await }));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, HeaderValue::from_static(content_type))
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))
        .body(body)
        .map_err(|e| ApiError::Internal(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_as_rfc_4180_says() {
        let mut out = String::new();
        push_csv_record(&mut out, ["plain", "a,b", "say \"hi\"", "two\nlines", "cr\rhere", "#not-a-comment", ""]);
        assert_eq!(out, "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\"cr\rhere\",\"#not-a-comment\",\r\n");
    }

    #[test]
    fn the_csv_trailer_is_one_record_of_two_fields() -> anyhow::Result<()> {
        let head = SignedHead::from_parts("cairn".into(), 3, &[7; 32], 1_700_000_000_000, "k1".into(), &[1; 64]);
        let text = String::from_utf8(trailer(ExportFormat::Csv, &head)?)?;
        let (tag, json) = text.trim_end().split_once(',').unwrap_or_default();
        assert_eq!(tag, "#head");
        let unquoted =
            json.strip_prefix('"').and_then(|j| j.strip_suffix('"')).unwrap_or_default().replace("\"\"", "\"");
        assert_eq!(serde_json::from_str::<SignedHead>(&unquoted)?, head);
        let line = String::from_utf8(trailer(ExportFormat::Ndjson, &head)?)?;
        let value: serde_json::Value = serde_json::from_str(&line)?;
        assert_eq!(serde_json::from_value::<SignedHead>(value["head"].clone())?, head);
        Ok(())
    }
}
