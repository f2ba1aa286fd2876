//! The byte remover: a durable consumer on EVENTS that turns each FileDeleted into a
//! `files.remove` job, which removes the file's bytes from the store.
//!
//! The consumer itself never talks to the store: it only enqueues, in one short transaction per
//! batch, with the idempotency key `files.remove:<file_id>`, so a redelivered event, or two
//! processes handed the same one, make one job. A store that is away is then the job queue's
//! business (retries with backoff, and a dead job an operator can retry once the store is back),
//! and events are no longer parked for it. Events are parked under [`PARKING_NAME`] only when
//! Postgres keeps refusing the enqueue. The sweeper never removes the bytes of a file the log
//! knows, so a dead `files.remove` job is the one place such bytes are left: the dead jobs say
//! which.

use async_nats::jetstream;
use cairn_platform::clock::SharedClock;
use cairn_platform::envelope::EventEnvelope;
use cairn_platform::jobs::kinds::FILES_REMOVE;
use cairn_platform::jobs::{self, NewJob};
use cairn_platform::nats::{self, EventBatchHandler, Namespace};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The durable consumer's name.
pub const CONSUMER: &str = "worker_files";

/// The name its parked events are listed under.
pub const PARKING_NAME: &str = "files";

/// Who the jobs say asked for them.
pub const ENQUEUED_BY: &str = "event:FileDeleted";

/// What the remover reads from a FileDeleted.
#[derive(Debug, Deserialize)]
struct Deleted {
    backend: String,
    key: String,
}

/// Turns deleted files into `files.remove` jobs.
#[derive(Clone)]
pub struct FileRemover {
    pool: PgPool,
    clock: SharedClock,
}

impl FileRemover {
    /// A remover enqueueing in `pool`, on `clock`.
    #[must_use]
    pub fn new(pool: PgPool, clock: SharedClock) -> Self {
        Self { pool, clock }
    }

    /// The idempotency key of the job that removes `file_id`'s bytes.
    #[must_use]
    pub fn job_key(file_id: &str) -> String {
        format!("{FILES_REMOVE}:{file_id}")
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
        tracing::info!("file remover running");
        let pool = self.pool.clone();
        nats::consume(consumer, batch, self, PARKING_NAME, pool, shutdown).await;
        Ok(())
    }
}

impl EventBatchHandler for FileRemover {
    async fn handle(&self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        let mut wanted = Vec::new();
        for event in events {
            if event.aggregate_type == "File" && event.event_type == "FileDeleted" {
                let deleted: Deleted = serde_json::from_value(event.body().clone())
                    .map_err(|e| anyhow::anyhow!("FileDeleted {} cannot be read: {e}", event.aggregate_id))?;
                // The handler checks the key is the file's own and refuses the job otherwise,
                // where an operator sees it among the failed jobs.
                let args = json!({"file_id": event.aggregate_id, "key": deleted.key, "backend": deleted.backend});
                let job = NewJob::new(FILES_REMOVE, args)
                    .idempotency_key(Self::job_key(&event.aggregate_id))
                    .enqueued_by(ENQUEUED_BY);
                wanted.push(job);
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let mut tx = self.pool.begin().await?;
        for job in &wanted {
            let enqueued = jobs::enqueue(&mut tx, job, now).await?;
            if enqueued.created {
                tracing::debug!(job_id = %enqueued.id, args = %job.args, "removal of a deleted file's bytes enqueued");
            }
        }
        tx.commit().await?;
        Ok(())
    }
}
