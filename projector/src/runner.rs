//! The checkpointed apply loop every projection shares, and rebuilds from the log.

use std::future::Future;

use async_nats::jetstream;
use cairn_platform::checkpoint::{self, CHECKPOINT_CHANNEL};
use cairn_platform::envelope::{ConsistencyToken, EventEnvelope};
use cairn_platform::nats::{self, EventBatchHandler, Namespace};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// A read model built from events.
pub trait Projection: Send + Sync + Clone + 'static {
    /// Checkpoint and consumer name.
    const NAME: &'static str;
    /// The tables it owns, swapped together by a rebuild.
    const TABLES: &'static [&'static str];

    /// Applies one event to the tables in `schema`. Called inside the batch's transaction.
    fn apply(
        &self,
        conn: &mut PgConnection,
        schema: &str,
        event: &EventEnvelope,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Applies `events`, in order, to the tables in `schema`. Called inside the batch's
    /// transaction. By default one [`Projection::apply`] each; a projection that sees many events
    /// folds them and writes each changed row once.
    fn apply_batch(
        &self,
        conn: &mut PgConnection,
        schema: &str,
        events: &[&EventEnvelope],
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        async move {
            for event in events {
                self.apply(conn, schema, event).await?;
            }
            Ok(())
        }
    }
}

struct Checkpointed<P: Projection> {
    pool: PgPool,
    projection: P,
}

impl<P: Projection> EventBatchHandler for Checkpointed<P> {
    async fn handle(&self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        // The row lock serialises this projection's writers (and a rebuild's final swap).
        let start = lock_checkpoint(&mut tx, P::NAME).await?;
        let mut checkpoint = start;
        let mut pending: Vec<&EventEnvelope> = Vec::with_capacity(events.len());
        for event in events {
            if event.position() <= checkpoint {
                continue; // delivered twice: already applied
            }
            if event.previous() > checkpoint {
                // Its predecessor has not been applied: take the missing events from the log.
                self.projection.apply_batch(&mut tx, "public", &pending).await?;
                pending.clear();
                fill_gap(&mut tx, &self.projection, checkpoint, event.previous()).await?;
            }
            pending.push(event);
            checkpoint = event.position();
        }
        self.projection.apply_batch(&mut tx, "public", &pending).await?;
        if checkpoint != start {
            save_checkpoint(&mut tx, P::NAME, checkpoint).await?;
        }
        tx.commit().await?;
        metrics::gauge!("cairn_projector_checkpoint_position", "projection" => P::NAME).set(checkpoint.pos as f64);
        Ok(())
    }
}

/// Locks projection `name`'s checkpoint row (creating it when missing) and reads it.
async fn lock_checkpoint(conn: &mut PgConnection, name: &str) -> sqlx::Result<ConsistencyToken> {
    let select = "SELECT last_tx::text::bigint, last_pos FROM projection_checkpoints WHERE name = $1 FOR UPDATE";
    let mut row: Option<(i64, i64)> = sqlx::query_as(select).bind(name).fetch_optional(&mut *conn).await?;
    if row.is_none() {
        sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(name)
            .execute(&mut *conn)
            .await?;
        row = sqlx::query_as(select).bind(name).fetch_optional(&mut *conn).await?;
    }
    let (tx, pos) = row.unwrap_or_default();
    Ok(ConsistencyToken { tx: u64::try_from(tx).unwrap_or(0), pos })
}

/// Advances projection `name`'s checkpoint and announces it, in one statement.
async fn save_checkpoint(conn: &mut PgConnection, name: &str, at: ConsistencyToken) -> sqlx::Result<()> {
    sqlx::query(
        "WITH saved AS (UPDATE projection_checkpoints SET last_tx = $2::text::xid8, last_pos = $3, updated_at = now() \
                        WHERE name = $1 RETURNING name) \
         SELECT pg_notify($4, $5) FROM saved",
    )
    .bind(name)
    .bind(at.tx.to_string())
    .bind(at.pos)
    .bind(CHECKPOINT_CHANNEL)
    .bind(checkpoint::notification(name, at))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Applies the log's events after `from` up to and including `to`; returns `to`.
async fn fill_gap<P: Projection>(
    conn: &mut PgConnection,
    projection: &P,
    from: ConsistencyToken,
    to: ConsistencyToken,
) -> anyhow::Result<ConsistencyToken> {
    let mut at = from;
    while at < to {
        let events = cairn_platform::log::read_after(conn, at, 1000).await?;
        if events.is_empty() {
            anyhow::bail!("gap after {at} up to {to} is not in the events table yet");
        }
        let batch: Vec<&EventEnvelope> = events.iter().take_while(|e| e.position() <= to).collect();
        projection.apply_batch(conn, "public", &batch).await?;
        at = batch.last().map_or(to, |e| e.position());
    }
    tracing::info!(projection = P::NAME, from = %from, to = %to, "filled a gap from the events table");
    Ok(at)
}

/// Runs projection `P` as a durable consumer until `shutdown`.
///
/// # Errors
/// When the consumer cannot be created.
pub async fn run<P: Projection>(
    pool: PgPool,
    js: jetstream::Context,
    ns: Namespace,
    projection: P,
    batch: usize,
    replicas: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stream = nats::ensure_events_stream(&js, &ns, replicas).await?;
    let consumer = nats::ensure_durable_consumer(&stream, &format!("projector_{}", P::NAME)).await?;
    tracing::info!(projection = P::NAME, "projector running");
    nats::consume(consumer, batch, Checkpointed { pool, projection }, P::NAME, shutdown).await;
    Ok(())
}

/// The schema a rebuild builds its tables in, beside the live ones.
pub const REBUILD_SCHEMA: &str = "cairn_rebuild";

/// Rebuilds projection `P` from the events table without taking reads down: builds new tables in
/// [`REBUILD_SCHEMA`] in batches, then, holding the live checkpoint's row lock (which pauses the
/// live projector for a moment), applies what the live projector did meanwhile and swaps the
/// tables in. With `swap = false` the rebuilt tables are left beside the live ones for comparison.
/// Returns the number of events read.
///
/// # Errors
/// When Postgres fails.
pub async fn rebuild<P: Projection>(pool: &PgPool, projection: &P, batch: i64, swap: bool) -> anyhow::Result<u64> {
    let mut conn = pool.acquire().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {REBUILD_SCHEMA} CASCADE")).execute(&mut *conn).await?;
    sqlx::query(&format!("CREATE SCHEMA {REBUILD_SCHEMA}")).execute(&mut *conn).await?;
    for table in P::TABLES {
        sqlx::query(&format!("CREATE TABLE {REBUILD_SCHEMA}.{table} (LIKE public.{table} INCLUDING ALL)"))
            .execute(&mut *conn)
            .await?;
    }
    let mut at = ConsistencyToken::default();
    let mut count = 0u64;
    loop {
        let mut tx = conn.begin().await?;
        let events = cairn_platform::log::read_after(&mut tx, at, batch).await?;
        let all: Vec<&EventEnvelope> = events.iter().collect();
        projection.apply_batch(&mut tx, REBUILD_SCHEMA, &all).await?;
        at = events.last().map_or(at, EventEnvelope::position);
        tx.commit().await?;
        count += events.len() as u64;
        if (events.len() as i64) < batch {
            break;
        }
    }
    let mut tx = conn.begin().await?;
    let live = lock_checkpoint(&mut tx, P::NAME).await?;
    // Bring the new tables exactly to the live checkpoint: no further, no less.
    while at < live {
        let events = cairn_platform::log::read_after(&mut tx, at, batch).await?;
        if events.is_empty() {
            break;
        }
        let batch: Vec<&EventEnvelope> = events.iter().take_while(|e| e.position() <= live).collect();
        projection.apply_batch(&mut tx, REBUILD_SCHEMA, &batch).await?;
        at = batch.last().map_or(at, |e| e.position());
        count += batch.len() as u64;
        if events.last().is_some_and(|e| e.position() > live) {
            break;
        }
    }
    if swap {
        for table in P::TABLES {
            sqlx::query(&format!("DROP TABLE public.{table}")).execute(&mut *tx).await?;
            sqlx::query(&format!("ALTER TABLE {REBUILD_SCHEMA}.{table} SET SCHEMA public")).execute(&mut *tx).await?;
        }
        sqlx::query(&format!("DROP SCHEMA {REBUILD_SCHEMA}")).execute(&mut *tx).await?;
        if at > live {
            // The live projector had applied nothing yet: the rebuilt tables are now ahead.
            save_checkpoint(&mut tx, P::NAME, at).await?;
        }
    }
    tx.commit().await?;
    tracing::info!(projection = P::NAME, events = count, swapped = swap, "rebuild finished");
    Ok(count)
}
