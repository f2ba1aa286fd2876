//! Parked events: what a consumer could not apply, recorded so that it moves on instead of
//! retrying for ever, and shown to operators.
//!
//! An operator's retry or skip is an event in the log (`ParkedEventRetryRequested`,
//! `ParkedEventSkipped` on the `ParkedEvent` aggregate) that names the consumer. Each consumer
//! acts on the ones addressed to it when it reaches them in its stream: so a retry is applied by
//! the consumer itself, in order, in its own transaction, on whichever process runs it.

use uuid::Uuid;

use crate::envelope::EventEnvelope;

/// The aggregate type of operators' decisions about parked events.
pub const AGGREGATE: &str = "ParkedEvent";

/// An operator's decision addressed to one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Apply the parked event again.
    Retry(Uuid),
    /// Leave it unapplied.
    Skip(Uuid),
}

/// The decision `event` carries for `consumer`, if it is one addressed to it.
#[must_use]
pub fn control(event: &EventEnvelope, consumer: &str) -> Option<Control> {
    if event.aggregate_type != AGGREGATE {
        return None;
    }
    let body = event.body();
    if body.get("consumer").and_then(serde_json::Value::as_str) != Some(consumer) {
        return None;
    }
    let event_id = body.get("event_id").and_then(serde_json::Value::as_str)?.parse().ok()?;
    match event.event_type.as_str() {
        "ParkedEventRetryRequested" => Some(Control::Retry(event_id)),
        "ParkedEventSkipped" => Some(Control::Skip(event_id)),
        _ => None,
    }
}

/// Records that `consumer` could not apply `event` (again, when it was parked before).
///
/// # Errors
/// When the statement fails.
pub async fn park<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    consumer: &str,
    event: &EventEnvelope,
    error: &anyhow::Error,
) -> sqlx::Result<()> {
    let error = format!("{error:#}");
    tracing::error!(
        consumer,
        event_id = %event.event_id,
        event_type = event.event_type,
        position = %event.position(),
        error,
        "event parked: it cannot be applied; the consumer moves on"
    );
    metrics::counter!("cairn_parked_events_total", "consumer" => consumer.to_owned()).increment(1);
    sqlx::query(
        "INSERT INTO parked_events (consumer, event_id, transaction_id, global_position, aggregate_type, aggregate_id, \
                                    event_type, event_version, error) \
         VALUES ($1, $2, $3::text::xid8, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (consumer, event_id) DO UPDATE SET error = EXCLUDED.error, status = 'parked', \
             attempts = parked_events.attempts + 1, updated_at = now()",
    )
    .bind(consumer)
    .bind(event.event_id)
    .bind(event.transaction_id.to_string())
    .bind(event.global_position)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(&event.event_type)
    .bind(&event.event_version)
    .bind(error)
    .execute(executor)
    .await?;
    Ok(())
}

/// Whether `event_id` is parked (and not yet resolved or skipped) for `consumer`.
///
/// # Errors
/// When the query fails.
pub async fn is_parked<'e>(executor: impl sqlx::PgExecutor<'e>, consumer: &str, event_id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM parked_events WHERE consumer = $1 AND event_id = $2 AND status = 'parked')",
    )
    .bind(consumer)
    .bind(event_id)
    .fetch_one(executor)
    .await
}

/// A retried event applied: it is parked no more.
///
/// # Errors
/// When the statement fails.
pub async fn resolved<'e>(executor: impl sqlx::PgExecutor<'e>, consumer: &str, event_id: Uuid) -> sqlx::Result<()> {
    tracing::info!(consumer, %event_id, "parked event applied on retry");
    set_status(executor, consumer, event_id, "resolved").await
}

/// A parked event skipped by an operator.
///
/// # Errors
/// When the statement fails.
pub async fn skipped<'e>(executor: impl sqlx::PgExecutor<'e>, consumer: &str, event_id: Uuid) -> sqlx::Result<()> {
    tracing::info!(consumer, %event_id, "parked event skipped");
    set_status(executor, consumer, event_id, "skipped").await
}

async fn set_status<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    consumer: &str,
    event_id: Uuid,
    status: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE parked_events SET status = $3, updated_at = now() \
         WHERE consumer = $1 AND event_id = $2 AND status = 'parked'",
    )
    .bind(consumer)
    .bind(event_id)
    .bind(status)
    .execute(executor)
    .await?;
    Ok(())
}
