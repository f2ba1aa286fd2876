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
}

struct Checkpointed<P: Projection> {
    pool: PgPool,
    projection: P,
}

impl<P: Projection> EventBatchHandler for Checkpointed<P> {
    async fn handle(&self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        // The row lock serialises this projection's writers (and a rebuild's final swap).
        sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(P::NAME)
            .execute(&mut *tx)
            .await?;
        let (last_tx, last_pos): (i64, i64) = sqlx::query_as(
            "SELECT last_tx::text::bigint, last_pos FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
        )
        .bind(P::NAME)
        .fetch_one(&mut *tx)
        .await?;
        let start = ConsistencyToken { tx: u64::try_from(last_tx).unwrap_or(0), pos: last_pos };
        let mut checkpoint = start;
        for event in events {
            if event.position() <= checkpoint {
                continue; // delivered twice: already applied
            }
            if event.previous() > checkpoint {
                // Its predecessor has not been applied: take the missing events from the log.
                fill_gap(&mut tx, &self.projection, checkpoint, event.previous()).await?;
            }
            self.projection.apply(&mut tx, "public", event).await?;
            checkpoint = event.position();
        }
        if checkpoint != start {
            save_checkpoint(&mut tx, P::NAME, checkpoint).await?;
        }
        tx.commit().await?;
        metrics::gauge!("cairn_projector_checkpoint_position", "projection" => P::NAME).set(checkpoint.pos as f64);
        Ok(())
    }
}

async fn save_checkpoint(conn: &mut PgConnection, name: &str, at: ConsistencyToken) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE projection_checkpoints SET last_tx = $2::text::xid8, last_pos = $3, updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(at.tx.to_string())
    .bind(at.pos)
    .execute(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
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
        for event in events.iter().take_while(|e| e.position() <= to) {
            projection.apply(conn, "public", event).await?;
            at = event.position();
        }
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
        for event in &events {
            projection.apply(&mut tx, REBUILD_SCHEMA, event).await?;
            at = event.position();
        }
        tx.commit().await?;
        count += events.len() as u64;
        if (events.len() as i64) < batch {
            break;
        }
    }
    let mut tx = conn.begin().await?;
    sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(P::NAME)
        .execute(&mut *tx)
        .await?;
    let (live_tx, live_pos): (i64, i64) =
        sqlx::query_as("SELECT last_tx::text::bigint, last_pos FROM projection_checkpoints WHERE name = $1 FOR UPDATE")
            .bind(P::NAME)
            .fetch_one(&mut *tx)
            .await?;
    let live = ConsistencyToken { tx: u64::try_from(live_tx).unwrap_or(0), pos: live_pos };
    // Bring the new tables exactly to the live checkpoint: no further, no less.
    while at < live {
        let events = cairn_platform::log::read_after(&mut tx, at, batch).await?;
        if events.is_empty() {
            break;
        }
        for event in events.iter().take_while(|e| e.position() <= live) {
            projection.apply(&mut tx, REBUILD_SCHEMA, event).await?;
            at = event.position();
            count += 1;
        }
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
