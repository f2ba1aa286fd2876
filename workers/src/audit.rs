//! The audit-log worker: one `audit_log` row per event (actor, action, target, client IP, user
//! agent, time, event id), written in one statement per batch and idempotent by event id.

use async_nats::jetstream;
use cairn_platform::envelope::EventEnvelope;
use cairn_platform::nats::{self, EventBatchHandler, Namespace};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The durable consumer's name.
pub const CONSUMER: &str = "worker_audit";

/// Writes the audit log.
#[derive(Clone)]
pub struct AuditWorker {
    pool: PgPool,
}

impl AuditWorker {
    /// A worker writing to `pool`.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Runs as a durable consumer until `shutdown`.
    ///
    /// # Errors
    /// When the consumer cannot be created.
    pub async fn run(
        self,
        js: jetstream::Context,
        ns: Namespace,
        batch: usize,
        replicas: usize,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let stream = nats::ensure_events_stream(&js, &ns, replicas).await?;
        let consumer = nats::ensure_durable_consumer(&stream, CONSUMER).await?;
        tracing::info!("audit worker running");
        let pool = self.pool.clone();
        nats::consume(consumer, batch, self, "audit", pool, shutdown).await;
        Ok(())
    }
}

impl EventBatchHandler for AuditWorker {
    async fn handle(&self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        let mut ids: Vec<Uuid> = Vec::with_capacity(events.len());
        let mut positions = Vec::with_capacity(events.len());
        let mut aggregate_types = Vec::with_capacity(events.len());
        let mut aggregate_ids = Vec::with_capacity(events.len());
        let mut sequences = Vec::with_capacity(events.len());
        let mut actions = Vec::with_capacity(events.len());
        let mut actors: Vec<Option<String>> = Vec::with_capacity(events.len());
        let mut targets = Vec::with_capacity(events.len());
        let mut ips: Vec<Option<String>> = Vec::with_capacity(events.len());
        let mut agents: Vec<Option<String>> = Vec::with_capacity(events.len());
        let mut requests: Vec<Option<String>> = Vec::with_capacity(events.len());
        let mut times: Vec<DateTime<Utc>> = Vec::with_capacity(events.len());
        for e in events {
            ids.push(e.event_id);
            positions.push(e.global_position);
            aggregate_types.push(e.aggregate_type.clone());
            aggregate_ids.push(e.aggregate_id.clone());
            sequences.push(e.sequence);
            actions.push(e.event_type.clone());
            actors.push(e.meta("actor_id").map(str::to_owned));
            targets.push(format!("{}:{}", e.aggregate_type, e.aggregate_id));
            ips.push(e.meta("client_ip").map(str::to_owned));
            agents.push(e.meta("user_agent").map(str::to_owned));
            requests.push(e.meta("request_id").map(str::to_owned));
            times.push(e.recorded_at);
        }
        sqlx::query(
            "INSERT INTO audit_log (event_id, global_position, aggregate_type, aggregate_id, sequence, action, actor_id, \
                                    target, client_ip, user_agent, request_id, occurred_at) \
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[], \
                                  $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[]) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(ids)
        .bind(positions)
        .bind(aggregate_types)
        .bind(aggregate_ids)
        .bind(sequences)
        .bind(actions)
        .bind(actors)
        .bind(targets)
        .bind(ips)
        .bind(agents)
        .bind(requests)
        .bind(times)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
