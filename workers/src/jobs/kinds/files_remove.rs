//! `files.remove`: removes the stored bytes of one deleted file.
//!
//! Enqueued by the file remover when a FileDeleted is delivered (one job per file, by idempotency
//! key), so a store that is away is retried by the queue with its backoff and, in the end, a dead
//! job an operator can retry, while the EVENTS consumer moves on. Removing what is already gone
//! succeeds, so a job run twice (a lost lease, a redelivered event) is harmless.

use anyhow::anyhow;
use cairn_platform::jobs::kinds::FILES_REMOVE;
use cairn_storage::FileStore;
use futures::future::BoxFuture;
use serde::Deserialize;
use uuid::Uuid;

use crate::jobs::{JobContext, JobError, JobHandler};

/// The arguments: the file and its key, and the store its bytes were written to when the
/// FileDeleted said so.
#[derive(Debug, Deserialize)]
struct Args {
    file_id: Uuid,
    key: String,
    #[serde(default)]
    backend: Option<String>,
}

/// The `files.remove` handler.
#[derive(Clone)]
pub struct FilesRemove {
    store: FileStore,
}

impl std::fmt::Debug for FilesRemove {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesRemove").field("backend", &self.store.backend().as_str()).finish()
    }
}

impl FilesRemove {
    /// A handler removing from `store` (the process's own).
    #[must_use]
    pub fn new(store: FileStore) -> Self {
        Self { store }
    }

    async fn remove(&self, job: &JobContext) -> Result<(), JobError> {
        let args: Args = serde_json::from_value(job.args.clone())
            .map_err(|e| JobError::Permanent(anyhow!("args must be {{file_id, key}}: {e}")))?;
        // A key of another file would remove that file's bytes: only the file's own key is removed.
        if FileStore::file_id_of(&args.key) != Some(args.file_id) {
            return Err(JobError::Permanent(anyhow!("the key {:?} is not the key of file {}", args.key, args.file_id)));
        }
        let backend = self.store.backend().as_str();
        if let Some(theirs) = args.backend.as_deref().filter(|theirs| *theirs != backend) {
            // Another process, opening that store, would succeed: worth retrying with the backoff
            // while the fleet is being moved, and visible as a dead job if it never is.
            return Err(JobError::Retry(anyhow!(
                "the bytes of file {} are in the {theirs} store; this process opens the {backend} store",
                args.file_id
            )));
        }
        self.store
            .delete(&args.key)
            .await
            .map_err(|e| JobError::Retry(anyhow!("cannot remove the bytes of deleted file {}: {e}", args.file_id)))?;
        metrics::counter!("cairn_files_removed_total", "backend" => backend).increment(1);
        tracing::info!(file_id = %args.file_id, key = args.key, backend, "deleted file's bytes removed");
        Ok(())
    }
}

impl JobHandler for FilesRemove {
    fn kind(&self) -> &'static str {
        FILES_REMOVE
    }

    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            tokio::select! {
                () = job.cancel.cancelled() => Err(JobError::Retry(anyhow!("the removal was stopped before the store answered"))),
                outcome = self.remove(job) => outcome,
            }
        })
    }
}
