//! The event envelope published on NATS, and the consistency token commands return.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

/// One event as every consumer receives it: the row of the events table, self-describing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Unique id; also the `Nats-Msg-Id`, and the idempotency key of every consumer.
    pub event_id: Uuid,
    /// `User`, …
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Position within the aggregate's stream, from 1.
    pub sequence: i64,
    /// `UserRegistered`, …
    pub event_type: String,
    /// Payload schema version.
    pub event_version: String,
    /// The writing transaction's id: first half of the global order.
    pub transaction_id: u64,
    /// Insertion position: second half of the global order.
    pub global_position: i64,
    /// Commit-side timestamp.
    pub recorded_at: DateTime<Utc>,
    /// The event itself, externally tagged by its type.
    pub payload: serde_json::Value,
    /// Who, from where, in answer to which request.
    pub metadata: serde_json::Value,
    /// Transaction id of the event before this one in the global order (0 for the first).
    #[serde(default)]
    pub previous_transaction_id: u64,
    /// Global position of the event before this one in the global order (0 for the first).
    /// A consumer that needs every event in order (a projector) compares it with its checkpoint
    /// to detect a gap, and fills the gap from the events table.
    #[serde(default)]
    pub previous_global_position: i64,
}

impl EventEnvelope {
    /// The position of this event in the global order.
    #[must_use]
    pub fn position(&self) -> ConsistencyToken {
        ConsistencyToken { tx: self.transaction_id, pos: self.global_position }
    }

    /// The position of the event before this one.
    #[must_use]
    pub fn previous(&self) -> ConsistencyToken {
        ConsistencyToken { tx: self.previous_transaction_id, pos: self.previous_global_position }
    }

    /// The body of the payload under its type tag (`payload[event_type]`), or the payload itself.
    #[must_use]
    pub fn body(&self) -> &serde_json::Value {
        self.payload.get(&self.event_type).unwrap_or(&self.payload)
    }

    /// A metadata field as a string.
    #[must_use]
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(serde_json::Value::as_str).filter(|s| !s.is_empty())
    }
}

/// The columns of the events table [`from_row`] reads, for queries that select whole events.
pub const EVENT_COLUMNS: &str = "event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, \
     transaction_id::text::bigint AS tx, global_position, recorded_at, payload, metadata";

/// One event from a row selected with [`EVENT_COLUMNS`] (its predecessor left unset).
///
/// # Errors
/// When a column is missing or mistyped.
pub fn from_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<EventEnvelope> {
    Ok(EventEnvelope {
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
        previous_transaction_id: 0,
        previous_global_position: 0,
    })
}

/// The stored event with id `event_id`.
///
/// # Errors
/// When the query fails.
pub async fn load<'e>(executor: impl sqlx::PgExecutor<'e>, event_id: Uuid) -> sqlx::Result<Option<EventEnvelope>> {
    let row = sqlx::query(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE event_id = $1"))
        .bind(event_id)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// A position in the global order `(transaction_id, global_position)`. Commands return the
/// position of their last event; a read that sends it back waits until the read model has it.
/// Written as `<transaction_id>.<global_position>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsistencyToken {
    /// Transaction id.
    pub tx: u64,
    /// Global position.
    pub pos: i64,
}

impl fmt::Display for ConsistencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.tx, self.pos)
    }
}

/// A token that is not `<u64>.<i64>`.
#[derive(Debug, thiserror::Error)]
#[error("consistency token must look like '<transaction>.<position>'")]
pub struct BadToken;

impl FromStr for ConsistencyToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tx, pos) = s.trim().split_once('.').ok_or(BadToken)?;
        Ok(Self { tx: tx.parse().map_err(|_| BadToken)?, pos: pos.parse().map_err(|_| BadToken)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_order_by_transaction_first() -> Result<(), BadToken> {
        let a: ConsistencyToken = "10.900".parse()?;
        let b: ConsistencyToken = "11.5".parse()?;
        assert!(a < b);
        assert_eq!(a.to_string(), "10.900");
        assert!("x".parse::<ConsistencyToken>().is_err());
        assert!("1.".parse::<ConsistencyToken>().is_err());
        Ok(())
    }
}
