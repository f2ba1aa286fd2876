//! The log as auditors read it: filters, the page query, and one event with its metadata lifted
//! out and its canonical text.
//!
//! **Order.** Oldest first by log position `(transaction_id, global_position)`, the relay's one
//! order and the tree's. Only events of transactions older than every transaction still running
//! (`transaction_id < pg_snapshot_xmin(pg_current_snapshot())`, the relay's horizon) are shown:
//! nothing can appear later behind them, so a cursor never skips an event.
//!
//! **Time filters.** `recorded_at` is the writing transaction's start, so it is not monotone along
//! the log: a transaction that started earlier can commit later. `from` and `to` select by *log
//! time*: the latest `recorded_at` of the event and of every event before it in the log
//! (`audit_leaves.log_time` for folded events; the same running maximum, seeded with the tree's,
//! over the tail the relay has not folded yet). Log time never decreases along the log, so
//! `[from, to)` is one contiguous stretch of it found with one index lookup per bound, and
//! consecutive windows `[a, b)`, `[b, c)` hold every event exactly once. An event's log time
//! equals its `recorded_at` unless it was recorded before an event that precedes it in the log;
//! such a late event belongs to the window of the log time it reached the log at.
//!
//! **Indexes** (migration `0013_audit_indexes.sql`): each equality filter has a composite index
//! ending in the position, so a page is one ordered range scan of it; positions and time bounds
//! use the relay's own `events_relay_order` and `audit_leaves_log_time`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use cairn_platform::envelope::ConsistencyToken;

/// Filters of the audit list and export (any combination).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// This aggregate type only.
    pub aggregate_type: Option<String>,
    /// This aggregate only.
    pub aggregate_id: Option<String>,
    /// This event type only.
    pub event_type: Option<String>,
    /// Events whose `metadata.actor_id` is this.
    pub actor_id: Option<String>,
    /// Log time at or after this.
    pub from: Option<DateTime<Utc>>,
    /// Log time before this.
    pub to: Option<DateTime<Utc>>,
}

/// Where a page starts and where the selection ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    /// Strictly after this position (the cursor).
    pub after: Option<ConsistencyToken>,
    /// At or before this position (an export's last leaf under its head).
    pub through: Option<ConsistencyToken>,
}

/// One event as auditors see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEvent {
    /// Log position `<transaction_id>.<global_position>` (also a cursor).
    #[schema(example = "742.1031")]
    pub position: String,
    /// The event's leaf in the audit tree; null until the relay folded it.
    pub leaf_index: Option<i64>,
    /// The event's id.
    pub event_id: Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Position within the aggregate's stream.
    pub sequence: i64,
    /// Event type.
    pub event_type: String,
    /// Payload schema version.
    pub event_version: String,
    /// When the writing transaction started.
    pub recorded_at: DateTime<Utc>,
    /// The event.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// Who, from where, in answer to which request.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// `metadata.actor_id`: the user who caused it.
    pub actor_id: Option<String>,
    /// `metadata.client_ip`.
    pub client_ip: Option<String>,
    /// `metadata.user_agent`.
    pub user_agent: Option<String>,
    /// `metadata.request_id`.
    pub request_id: Option<String>,
    /// `metadata.correlation_id`.
    pub correlation_id: Option<String>,
    /// `metadata.causation_id`.
    pub causation_id: Option<String>,
    /// The exact text whose UTF-8 bytes the leaf hashes: `leaf_hash = SHA-256(0x00 || canonical)`.
    pub canonical: String,
}

/// The metadata fields lifted out of `metadata`.
const LIFTED: [&str; 6] = ["actor_id", "client_ip", "user_agent", "request_id", "correlation_id", "causation_id"];

/// `metadata[key]` as text (a string as is, another non-null value as JSON).
fn lifted(metadata: &serde_json::Value, key: &str) -> Option<String> {
    match metadata.get(key)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

impl AuditEvent {
    fn from_row(row: &PgRow) -> sqlx::Result<Self> {
        let tx: String = row.try_get("tx")?;
        let pos: i64 = row.try_get("global_position")?;
        let metadata: serde_json::Value = row.try_get("metadata")?;
        let [actor_id, client_ip, user_agent, request_id, correlation_id, causation_id] =
            LIFTED.map(|key| lifted(&metadata, key));
        Ok(Self {
            position: format!("{tx}.{pos}"),
            leaf_index: row.try_get("leaf_index")?,
            event_id: row.try_get("event_id")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            recorded_at: row.try_get("recorded_at")?,
            payload: row.try_get("payload")?,
            actor_id,
            client_ip,
            user_agent,
            request_id,
            correlation_id,
            causation_id,
            metadata,
            canonical: row.try_get("canonical")?,
        })
    }

    /// This event's position (always there for an event read here).
    #[must_use]
    pub fn position(&self) -> Option<ConsistencyToken> {
        self.position.parse().ok()
    }
}

/// The largest `xid8` and `bigint`: "no upper bound" for a position.
const MAX_TX: &str = "18446744073709551615";
const MAX_POS: i64 = i64::MAX;

/// The tail the relay has not folded yet, with each event's log time (the running maximum of
/// `recorded_at`, seeded with the tree's). Empty but for the relay's lag (the whole log only with
/// `CAIRN_AUDIT_TREE=off`).
const TAIL: &str = "audit_tail AS MATERIALIZED (\
     SELECT t.transaction_id AS tx, t.global_position AS pos, \
            greatest(max(t.recorded_at) OVER (ORDER BY t.transaction_id, t.global_position), \
                     (SELECT log_time FROM audit_tree)) AS log_time \
     FROM events t \
     WHERE (t.transaction_id, t.global_position) > ((SELECT last_tx FROM audit_tree), (SELECT last_pos FROM audit_tree)) \
       AND t.transaction_id < pg_snapshot_xmin(pg_current_snapshot()))";

/// Pushes a CTE `name` holding the position of the first event whose log time is at or after
/// `at`: a leaf (one lookup in `audit_leaves_log_time`), or, when no folded leaf is that late, the
/// first such event of the tail.
fn push_time_bound(q: &mut QueryBuilder<'_, Postgres>, name: &str, at: DateTime<Utc>) {
    q.push(format!(", {name} AS (SELECT tx, pos FROM ((SELECT transaction_id AS tx, global_position AS pos FROM audit_leaves WHERE log_time >= "));
    q.push_bind(at);
    q.push(" ORDER BY log_time, leaf_index LIMIT 1) UNION ALL (SELECT tx, pos FROM audit_tail WHERE log_time >= ");
    q.push_bind(at);
    // Only when no leaf is that late (the newest leaf's log time, read from the index's end).
    q.push(" AND coalesce((SELECT max(log_time) FROM audit_leaves), '-infinity') < ");
    q.push_bind(at);
    q.push(" ORDER BY tx, pos LIMIT 1)) b ORDER BY tx, pos LIMIT 1)");
}

/// The page query: events matching `filter` inside `window`, oldest first, at most `limit`.
fn page_query<'a>(filter: &'a EventFilter, window: Window, limit: i64) -> QueryBuilder<'a, Postgres> {
    let mut q = QueryBuilder::new("");
    if filter.from.is_some() || filter.to.is_some() {
        // The bounds below follow as `, name AS (…)`.
        q.push("WITH ");
        q.push(TAIL);
    }
    if let Some(from) = filter.from {
        push_time_bound(&mut q, "audit_lo", from);
    }
    if let Some(to) = filter.to {
        push_time_bound(&mut q, "audit_hi", to);
    }
    q.push(
        " SELECT e.transaction_id::text AS tx, e.global_position, l.leaf_index, e.event_id, e.aggregate_type, \
         e.aggregate_id, e.sequence, e.event_type, e.event_version, e.recorded_at, e.payload, e.metadata, \
         audit_leaf_text(e) AS canonical \
         FROM events e LEFT JOIN audit_leaves l ON l.event_id = e.event_id \
         WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())",
    );
    if let Some(v) = &filter.aggregate_type {
        q.push(" AND e.aggregate_type = ").push_bind(v);
    }
    if let Some(v) = &filter.aggregate_id {
        q.push(" AND e.aggregate_id = ").push_bind(v);
    }
    if let Some(v) = &filter.event_type {
        q.push(" AND e.event_type = ").push_bind(v);
    }
    if let Some(v) = &filter.actor_id {
        q.push(" AND (e.metadata ->> 'actor_id') = ").push_bind(v);
    }
    if let Some(after) = window.after {
        q.push(" AND (e.transaction_id, e.global_position) > (")
            .push_bind(after.tx.to_string())
            .push("::xid8, ")
            .push_bind(after.pos)
            .push(")");
    }
    if let Some(through) = window.through {
        q.push(" AND (e.transaction_id, e.global_position) <= (")
            .push_bind(through.tx.to_string())
            .push("::xid8, ")
            .push_bind(through.pos)
            .push(")");
    }
    if filter.from.is_some() {
        // No event that late: the bound is NULL and nothing matches.
        q.push(" AND (e.transaction_id, e.global_position) >= ((SELECT tx FROM audit_lo), (SELECT pos FROM audit_lo))");
    }
    if filter.to.is_some() {
        q.push(" AND (e.transaction_id, e.global_position) < (coalesce((SELECT tx FROM audit_hi), '");
        q.push(MAX_TX);
        q.push("'::xid8), coalesce((SELECT pos FROM audit_hi), ");
        q.push(MAX_POS.to_string());
        q.push("))");
    }
    q.push(" ORDER BY e.transaction_id, e.global_position LIMIT ").push_bind(limit);
    q
}

/// One page of events matching `filter` inside `window`, oldest first, at most `limit`, and
/// whether more follow.
///
/// # Errors
/// When the query fails.
pub async fn page(
    pool: &PgPool,
    filter: &EventFilter,
    window: Window,
    limit: i64,
) -> sqlx::Result<(Vec<AuditEvent>, bool)> {
    let rows = page_query(filter, window, limit + 1).build().fetch_all(pool).await?;
    let mut items = rows.iter().map(AuditEvent::from_row).collect::<sqlx::Result<Vec<_>>>()?;
    let more = items.len() as i64 > limit;
    items.truncate(usize::try_from(limit).unwrap_or(0));
    Ok((items, more))
}

/// The position of leaf `leaf_index`, as folded.
///
/// # Errors
/// When the query fails.
pub async fn leaf_position(pool: &PgPool, leaf_index: u64) -> sqlx::Result<Option<ConsistencyToken>> {
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT transaction_id::text, global_position FROM audit_leaves WHERE leaf_index = $1")
            .bind(i64::try_from(leaf_index).unwrap_or(i64::MAX))
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|(tx, pos)| Some(ConsistencyToken { tx: tx.parse().ok()?, pos })))
}

/// The canonical text of the event `event_id`, as stored now.
///
/// # Errors
/// When the query fails.
pub async fn canonical(pool: &PgPool, event_id: Uuid) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT audit_leaf_text(e) FROM events e WHERE e.event_id = $1")
        .bind(event_id)
        .fetch_optional(pool)
        .await
}
