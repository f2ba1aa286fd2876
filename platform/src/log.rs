//! Reading the event log in the global order, safely past in-flight transactions.

use sqlx::{PgConnection, Row};

use crate::envelope::{ConsistencyToken, EventEnvelope};

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
    let rows = sqlx::query(
        "SELECT event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, \
                transaction_id::text::bigint AS tx, global_position, recorded_at, payload, metadata \
         FROM events \
         WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY transaction_id, global_position \
         LIMIT $3",
    )
    .bind(after.tx.to_string())
    .bind(after.pos)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    let mut previous = after;
    rows.into_iter()
        .map(|row| {
            let event = EventEnvelope {
                event_id: row.try_get("event_id")?,
                aggregate_type: row.try_get("aggregate_type")?,
                aggregate_id: row.try_get("aggregate_id")?,
                sequence: row.try_get("sequence")?,
                event_type: row.try_get("event_type")?,
                event_version: row.try_get("event_version")?,
                transaction_id: u64::try_from(row.try_get::<i64, _>("tx")?).unwrap_or_default(),
                global_position: row.try_get("global_position")?,
                recorded_at: row.try_get("recorded_at")?,
                payload: row.try_get("payload")?,
                metadata: row.try_get("metadata")?,
                previous_transaction_id: previous.tx,
                previous_global_position: previous.pos,
            };
            previous = event.position();
            Ok(event)
        })
        .collect()
}

/// The position of the newest event of one aggregate: the consistency token of a command.
///
/// # Errors
/// When the query fails.
pub async fn last_position_of<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    aggregate_type: &str,
    aggregate_id: &str,
) -> sqlx::Result<Option<ConsistencyToken>> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|(tx, pos)| ConsistencyToken { tx: u64::try_from(tx).unwrap_or_default(), pos }))
}
