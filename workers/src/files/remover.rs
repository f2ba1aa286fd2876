//! The byte remover: a durable consumer on EVENTS that removes a file's bytes from the store
//! when its FileDeleted is delivered.
//!
//! Removing is idempotent (removing what is gone succeeds), so a redelivered event, or two
//! processes handed the same one, are harmless. A store that keeps failing is tried a bounded
//! number of times and the event is then parked under [`PARKING_NAME`], so the consumer moves on;
//! an operator retries it once the store is back (`POST /api/v1/admin/projections/files/parked/…`).
//! The sweeper never removes the bytes of a file the log knows, so a parked removal is the one
//! place such bytes are left: the parked list says which.

use std::time::Duration;

use async_nats::jetstream;
use cairn_platform::envelope::EventEnvelope;
use cairn_platform::nats::{self, EventBatchHandler, Namespace};
use cairn_storage::{FileStore, StoreError};
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The durable consumer's name.
pub const CONSUMER: &str = "worker_files";

/// The name its parked events are listed under.
pub const PARKING_NAME: &str = "files";

/// The pauses between tries of one removal while the store fails, within one delivery. The
/// consumer loop tries a refused event a few times more before parking it, so a store that is
/// away for less than about half a minute loses nothing.
const STORE_RETRY_PAUSES: &[Duration] = &[Duration::from_millis(250), Duration::from_secs(1), Duration::from_secs(4)];

/// What the remover reads from a FileDeleted.
#[derive(Debug, Deserialize)]
struct Deleted {
    backend: String,
    key: String,
}

/// Removes the bytes of deleted files.
#[derive(Clone)]
pub struct FileRemover {
    store: FileStore,
}

impl FileRemover {
    /// A remover working on `store` (the process's own).
    #[must_use]
    pub fn new(store: FileStore) -> Self {
        Self { store }
    }

    /// Runs as a durable consumer until `shutdown`; what it parks is recorded in `pool`.
    ///
    /// # Errors
    /// When the consumer cannot be created.
    pub async fn run(
        self,
        pool: PgPool,
        js: jetstream::Context,
        ns: Namespace,
        batch: usize,
        replicas: usize,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let stream = nats::ensure_events_stream(&js, &ns, replicas).await?;
        let consumer = nats::ensure_durable_consumer(&stream, CONSUMER).await?;
        tracing::info!(backend = self.store.backend().as_str(), "file remover running");
        nats::consume(consumer, batch, self, PARKING_NAME, pool, shutdown).await;
        Ok(())
    }

    /// Removes the bytes `event` (a FileDeleted) names.
    async fn remove(&self, event: &EventEnvelope) -> anyhow::Result<()> {
        let deleted: Deleted = serde_json::from_value(event.body().clone())
            .map_err(|e| anyhow::anyhow!("FileDeleted {} cannot be read: {e}", event.aggregate_id))?;
        // A key of another file would remove that file's bytes: only the file's own key is removed.
        let own = FileStore::file_id_of(&deleted.key).is_some_and(|id| id.to_string() == event.aggregate_id);
        if !own {
            anyhow::bail!(
                "FileDeleted {} names the key {:?}, which is not that file's",
                event.aggregate_id,
                deleted.key
            );
        }
        let backend = self.store.backend().as_str();
        if deleted.backend != backend {
            anyhow::bail!(
                "the bytes of file {} are in the {} store; this process opens the {backend} store",
                event.aggregate_id,
                deleted.backend
            );
        }
        let mut pauses = STORE_RETRY_PAUSES.iter();
        loop {
            match self.store.delete(&deleted.key).await {
                Ok(()) => break,
                Err(e) => match pauses.next() {
                    Some(pause) => {
                        tracing::warn!(file_id = event.aggregate_id, key = deleted.key, error = %e, retry_in_ms = pause.as_millis() as u64, "cannot remove a deleted file's bytes; retrying");
                        tokio::time::sleep(*pause).await;
                    }
                    // Not transient on purpose: the consumer loop tries it a few times more, then parks it.
                    None => return Err(refused(e, &event.aggregate_id)),
                },
            }
        }
        metrics::counter!("cairn_files_removed_total", "backend" => backend).increment(1);
        tracing::info!(file_id = event.aggregate_id, key = deleted.key, backend, "deleted file's bytes removed");
        Ok(())
    }
}

fn refused(e: StoreError, file_id: &str) -> anyhow::Error {
    anyhow::anyhow!("cannot remove the bytes of deleted file {file_id}: {e}")
}

impl EventBatchHandler for FileRemover {
    async fn handle(&self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        for event in events {
            if event.aggregate_type == "File" && event.event_type == "FileDeleted" {
                self.remove(event).await?;
            }
        }
        Ok(())
    }
}
