//! The relay: the events table is the outbox. It tails the log in `(transaction_id,
//! global_position)` order, publishes each event to JetStream, waits for every PubAck, and only
//! then advances its checkpoint.
//!
//! - Gap safety comes from [`crate::reader::read_after`]: it never reads past the oldest running
//!   transaction, so an event whose transaction commits late is published, not skipped.
//! - Duplicates: `Nats-Msg-Id = event_id`, so a re-send after a crash (published, checkpoint not
//!   yet stored) is dropped by the stream's duplicate window.
//! - Order: each publish carries `Nats-Expected-Last-Msg-Id` of the event before it, so if one
//!   publish of a pipelined batch fails, every later one fails too and the stream never holds an
//!   event ahead of one that is missing. The batch is retried from the checkpoint.
//! - One active relay: a session-level advisory lock held on the relay's own connection. Others
//!   wait as hot standbys; when the holder dies its connection closes and the lock passes on. The
//!   checkpoint is written on the same connection, so a relay that lost its lock cannot write it.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::wakeup::{RelayWakeup, EVENTS_CHANNEL};
use cairn_platform::envelope::{ConsistencyToken, EventEnvelope};
use cairn_platform::nats::Namespace;

/// Publishes the event log to JetStream.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    ns: Namespace,
    batch: i64,
    idle_poll: Duration,
    wake: RelayWakeup,
}

impl Relay {
    /// A relay for `ns` publishing up to `batch` events per round.
    #[must_use]
    pub fn new(pool: PgPool, js: jetstream::Context, ns: Namespace, batch: i64) -> Self {
        Self { pool, js, ns, batch, idle_poll: Duration::from_millis(500), wake: RelayWakeup::local() }
    }

    /// Also wakes on `wake`, which this process's commands signal after each commit (without it,
    /// only `NOTIFY cairn_events` and the idle poll wake the relay).
    #[must_use]
    pub fn with_wake(mut self, wake: RelayWakeup) -> Self {
        self.wake = wake;
        self
    }

    /// Runs until `shutdown`: waits for the lock, then publishes; on any failure starts over.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.run_once(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "relay interrupted");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The advisory-lock key of this namespace's relay.
    fn lock_key(&self) -> i64 {
        // FNV-1a: stable across processes and versions, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in format!("cairn-relay:{}", self.ns.as_str()).bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        i64::from_ne_bytes(hash.to_ne_bytes())
    }

    async fn run_once(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await.context("relay cannot reach Postgres")?.detach();
        let key = self.lock_key();
        let mut waiting_logged = false;
        loop {
            let got: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut conn).await?;
            if got {
                break;
            }
            if !waiting_logged {
                tracing::info!("another relay is active; standing by");
                waiting_logged = true;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!(namespace = self.ns.as_str(), "relay active");
        let result = self.publish_loop(&mut conn, shutdown).await;
        // Closing the connection releases the lock.
        let _ = conn.close().await;
        result
    }

    async fn publish_loop(&self, conn: &mut PgConnection, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(EVENTS_CHANNEL).await?;
        let mut woken = self.wake.subscribe();
        sqlx::query("INSERT INTO relay_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(self.ns.as_str())
            .execute(&mut *conn)
            .await?;
        let (tx, pos): (i64, i64) =
            sqlx::query_as("SELECT last_tx::text::bigint, last_pos FROM relay_checkpoints WHERE name = $1")
                .bind(self.ns.as_str())
                .fetch_one(&mut *conn)
                .await?;
        let mut checkpoint = ConsistencyToken { tx: u64::try_from(tx).unwrap_or_default(), pos };
        let mut held_back_rounds = 0u32;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // Anything appended from here on wakes the waits below.
            woken.borrow_and_update();
            let events = crate::reader::read_after(conn, checkpoint, self.batch).await?;
            if events.is_empty() {
                // Committed events may be waiting behind an older transaction still running (the
                // safe horizon): look again soon rather than waiting for the next NOTIFY.
                let held_back: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE (transaction_id, global_position) > ($1::text::xid8, $2))",
                )
                .bind(checkpoint.tx.to_string())
                .bind(checkpoint.pos)
                .fetch_one(&mut *conn)
                .await?;
                if held_back {
                    // A transaction still running holds the horizon: look again when this process
                    // commits something (often the very transaction in the way), or after a pause
                    // that grows while a long transaction holds it.
                    held_back_rounds = (held_back_rounds + 1).min(6);
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        _ = woken.changed() => {}
                        () = tokio::time::sleep(Duration::from_millis(1 << held_back_rounds)) => {}
                    }
                    continue;
                }
                held_back_rounds = 0;
                metrics::gauge!("cairn_relay_lag_events").set(0.0);
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    n = listener.recv() => { n?; }
                    _ = woken.changed() => {}
                    () = tokio::time::sleep(self.idle_poll) => {}
                }
                continue;
            }
            self.publish_batch(&events).await?;
            // The horizon moved: the next wait behind a running transaction starts short again.
            held_back_rounds = 0;
            let last = events.last().map(EventEnvelope::position).unwrap_or(checkpoint);
            sqlx::query(
                "UPDATE relay_checkpoints SET last_tx = $2::text::xid8, last_pos = $3, updated_at = now() WHERE name = $1",
            )
            .bind(self.ns.as_str())
            .bind(last.tx.to_string())
            .bind(last.pos)
            .execute(&mut *conn)
            .await?;
            checkpoint = last;
            metrics::counter!("cairn_relay_published_total").increment(events.len() as u64);
            metrics::gauge!("cairn_relay_checkpoint_position").set(last.pos as f64);
            if events.len() as i64 == self.batch {
                let newest: Option<i64> =
                    sqlx::query_scalar("SELECT max(global_position) FROM events").fetch_one(&mut *conn).await?;
                metrics::gauge!("cairn_relay_lag_events")
                    .set(newest.unwrap_or(0).saturating_sub(last.pos).max(0) as f64);
            }
        }
    }

    /// Sends every event, then awaits every PubAck. Any failure fails the whole batch.
    async fn publish_batch(&self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(events.len());
        let mut previous: Option<String> = None;
        for event in events {
            let id = event.event_id.to_string();
            let body = serde_json::to_vec(event)?;
            let mut message = PublishMessage::build().payload(body.into()).message_id(&id);
            if let Some(prev) = &previous {
                message = message.expected_last_message_id(prev);
            }
            let subject = self.ns.event_subject(&event.aggregate_type, &event.event_type);
            acks.push(self.js.send_publish(subject, message).await.context("publish to JetStream failed")?);
            previous = Some(id);
        }
        for ack in acks {
            ack.await.context("JetStream did not acknowledge a publish")?;
        }
        Ok(())
    }
}
