//! Reading the event log in the global order, safely past in-flight transactions.

use cairn_platform::envelope::{from_row, EVENT_COLUMNS};
use sqlx::PgConnection;

use cairn_platform::envelope::{ConsistencyToken, EventEnvelope};

/// Reads up to `limit` events after `after` in `(transaction_id, global_position)` order.
///
/// Only transactions older than every transaction still running are read
/// (`transaction_id < pg_snapshot_xmin(pg_current_snapshot())`): a transaction that took a lower
/// `global_position` but commits later must not be skipped, and everything with a transaction id
/// below the snapshot's xmin has either committed or aborted, so nothing new can appear behind
/// the returned events.
///
/// Each returned event names its predecessor in this order (`after` for the first), so a
/// consumer can tell a gap from a duplicate.
///
/// # Errors
/// When the query fails.
pub async fn read_after(
    conn: &mut PgConnection,
    after: ConsistencyToken,
    limit: i64,
) -> sqlx::Result<Vec<EventEnvelope>> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY transaction_id, global_position \
         LIMIT $3"
    ))
    .bind(after.tx.to_string())
    .bind(after.pos)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    let mut previous = after;
    rows.iter()
        .map(|row| {
            let mut event = from_row(row)?;
            event.previous_transaction_id = previous.tx;
            event.previous_global_position = previous.pos;
            previous = event.position();
            Ok(event)
        })
        .collect()
}

/// The newest `limit` events of one aggregate, newest first.
///
/// # Errors
/// When the query fails.
pub async fn last_events_of<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    aggregate_type: &str,
    aggregate_id: &str,
    limit: i64,
) -> sqlx::Result<Vec<EventEnvelope>> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence DESC LIMIT $3"
    ))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(limit)
    .fetch_all(executor)
    .await?;
    rows.iter().map(from_row).collect()
}
