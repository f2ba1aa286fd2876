//! The relay's checkpoint: the position, in `(transaction_id, global_position)` order, of the last
//! event the stream is known to hold, one row per namespace in `relay_checkpoints`.
//!
//! The active relay reads and writes it on the connection that holds its advisory lock, so a
//! relay that lost the lock (its connection closed) can no longer move it.

use sqlx::PgConnection;

use cairn_platform::envelope::{ConsistencyToken, EventEnvelope};

/// Reads the checkpoint of namespace `name`, creating it at zero the first time.
///
/// # Errors
/// When a query fails.
pub async fn load(conn: &mut PgConnection, name: &str) -> sqlx::Result<ConsistencyToken> {
    sqlx::query("INSERT INTO relay_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    let (tx, pos): (i64, i64) =
        sqlx::query_as("SELECT last_tx::text::bigint, last_pos FROM relay_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *conn)
            .await?;
    Ok(ConsistencyToken { tx: u64::try_from(tx).unwrap_or_default(), pos })
}

/// Reads the checkpoint of namespace `name` without creating it (zero before the first relay
/// ran), on any connection: for measuring, not for publishing.
///
/// # Errors
/// When the query fails.
pub async fn read<'e>(executor: impl sqlx::PgExecutor<'e>, name: &str) -> sqlx::Result<ConsistencyToken> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT last_tx::text::bigint, last_pos FROM relay_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(executor)
            .await?;
    Ok(cairn_platform::checkpoint::from_row(row))
}

/// Stores `at` as the checkpoint of namespace `name`.
///
/// # Errors
/// When the update fails.
pub async fn store(conn: &mut PgConnection, name: &str, at: ConsistencyToken) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE relay_checkpoints SET last_tx = $2::text::xid8, last_pos = $3, updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(at.tx.to_string())
    .bind(at.pos)
    .execute(conn)
    .await?;
    Ok(())
}

/// The position in the log of the event with `event`'s id, if the log holds it. The stored row,
/// not the message, is the authority: a message could come from another log.
///
/// # Errors
/// When the query fails.
pub async fn position_in_log(conn: &mut PgConnection, event: &EventEnvelope) -> sqlx::Result<Option<ConsistencyToken>> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT transaction_id::text::bigint, global_position FROM events WHERE event_id = $1")
            .bind(event.event_id)
            .fetch_optional(conn)
            .await?;
    Ok(row.map(|(tx, pos)| ConsistencyToken { tx: u64::try_from(tx).unwrap_or_default(), pos }))
}
