//! The orphan sweeper: removes stored bytes that no event names, once they are older than the
//! grace period (`CAIRN_FILES_ORPHAN_GRACE_SECS`). A pass runs as the `files.sweep` job, which a
//! built-in schedule enqueues every five minutes, or at once with `cairn admin sweep-files`.
//!
//! An upload registers a `file_uploads` row before its first byte is stored, and the transaction
//! that appends its FileUploaded deletes that row (the quota trigger). So at any moment each
//! stored object is named by exactly one of: an upload row (in flight), an event of its File
//! aggregate (a file, deleted or not), or nothing (an orphan). A pass has two parts:
//!
//! 1. Upload rows started before now − grace are uploads that died (the process crashed or was
//!    killed between storing and appending). Each row is claimed and deleted, and its reservation
//!    given back to `file_quota`, in one statement; then its bytes are removed. Claiming the row
//!    first means a pass and a late append never both win (whoever deletes the row decides), and
//!    a crash between the statement and the removal leaves bytes that no row and no event name,
//!    which part 2 removes.
//! 2. Every object written before now − grace is looked up by the file id its key carries: it is
//!    removed only if the log has no event of that File aggregate and no upload row names it,
//!    both read in one statement (one snapshot: the append that turns a row into an event is
//!    seen either before or after, never half). A key of another shape is logged and left.
//!
//! Nothing else is ever removed: the bytes of a deleted file are `files.remove`'s, and a file the log
//! knows keeps its bytes here whatever happened to its removal. The grace is measured on the
//! injectable clock, so tests move time instead of waiting. One process sweeps at a time: a pass
//! tries a Postgres advisory lock on a connection of its own and, if another process holds it,
//! does nothing (the lock goes away with its connection, should the process die mid-pass).

use std::collections::HashSet;
use std::time::Duration;

use cairn_platform::clock::SharedClock;
use cairn_platform::Settings;
use cairn_storage::{FileStore, StoredObject};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use sqlx::{Connection, PgPool};
use uuid::Uuid;

/// How many upload rows, or listed objects, are looked up per statement.
const PAGE: usize = 500;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Whether this process swept (false: another process held the sweeper's lock).
    pub swept: bool,
    /// Uploads that died: rows deleted and reservations given back.
    pub uploads_reaped: u64,
    /// Objects removed from the store (of dead uploads, and named by nothing).
    pub objects_removed: u64,
    /// Objects older than the grace that belong to a file or a live upload: kept.
    pub objects_kept: u64,
    /// Objects whose key is not of the store's shape: logged and kept.
    pub foreign_keys: u64,
    /// Removals the store refused: left for the next pass.
    pub failures: u64,
}

/// Removes what uploads that died left behind.
#[derive(Clone)]
pub struct FileSweeper {
    pool: PgPool,
    store: FileStore,
    clock: SharedClock,
    grace: Duration,
}

impl FileSweeper {
    /// A sweeper of `store` with the grace and clock of `settings`.
    #[must_use]
    pub fn new(pool: PgPool, store: FileStore, settings: &Settings) -> Self {
        Self { pool, store, clock: settings.clock.clone(), grace: settings.files.orphan_grace }
    }

    /// One pass now (unless another process is sweeping: then `swept` is false).
    ///
    /// # Errors
    /// When Postgres fails or the store cannot be listed; what was removed until then stays removed.
    pub async fn sweep(&self) -> anyhow::Result<SweepReport> {
        // A connection of its own, never returned to the pool: closing it (or the process dying)
        // releases the lock, and no pooled connection is ever handed out holding it.
        let mut lock = self.pool.acquire().await?.detach();
        let key = cairn_platform::db::advisory_key("cairn-files-sweeper");
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut lock).await?;
        if !held {
            let _ = lock.close().await;
            metrics::counter!("cairn_files_sweeps_total", "outcome" => "skipped").increment(1);
            tracing::debug!("another process is sweeping the file store");
            return Ok(SweepReport::default());
        }
        let now = self.clock.now();
        let before = chrono::Duration::from_std(self.grace)
            .ok()
            .and_then(|grace| now.checked_sub_signed(grace))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut report = SweepReport { swept: true, ..SweepReport::default() };
        let outcome = async {
            self.reap_dead_uploads(before, &mut report).await?;
            self.remove_unnamed(before, &mut report).await
        }
        .await;
        let _ = lock.close().await;
        outcome?;
        metrics::counter!("cairn_files_sweeps_total", "outcome" => "done").increment(1);
        if report.uploads_reaped + report.objects_removed + report.failures + report.foreign_keys > 0 {
            tracing::info!(
                uploads_reaped = report.uploads_reaped,
                objects_removed = report.objects_removed,
                objects_kept = report.objects_kept,
                foreign_keys = report.foreign_keys,
                failures = report.failures,
                "file sweep done"
            );
        }
        Ok(report)
    }

    /// Part 1: upload rows started before `before`.
    async fn reap_dead_uploads(&self, before: DateTime<Utc>, report: &mut SweepReport) -> anyhow::Result<()> {
        let backend = self.store.backend().as_str();
        // Each row is deleted as it is handled (or was by someone else), so the pages shrink.
        loop {
            let page: Vec<Uuid> = sqlx::query_scalar(
                "SELECT file_id FROM file_uploads WHERE started_at < $1 ORDER BY started_at, file_id LIMIT $2",
            )
            .bind(before)
            .bind(PAGE as i64)
            .fetch_all(&self.pool)
            .await?;
            if page.is_empty() {
                return Ok(());
            }
            for file_id in page {
                // The row and the reservation go together; the event check is a guard only
                // (the append deletes the row in its own transaction).
                let reaped: Option<(Uuid, String, String, i64)> = sqlx::query_as(
                    "WITH gone AS ( \
                         DELETE FROM file_uploads u WHERE u.file_id = $1 AND u.started_at < $2 \
                           AND NOT EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'File' AND e.aggregate_id = $1::text) \
                         RETURNING u.owner_id, u.backend, u.storage_key, u.reserved_bytes), \
                     given AS ( \
                         UPDATE file_quota q SET reserved_bytes = greatest(q.reserved_bytes - gone.reserved_bytes, 0) \
                         FROM gone WHERE q.owner_id = gone.owner_id) \
                     SELECT owner_id, backend, storage_key, reserved_bytes FROM gone",
                )
                .bind(file_id)
                .bind(before)
                .fetch_optional(&self.pool)
                .await?;
                let Some((owner_id, row_backend, key, reserved)) = reaped else { continue };
                report.uploads_reaped += 1;
                metrics::counter!("cairn_files_uploads_reaped_total").increment(1);
                tracing::info!(%file_id, %owner_id, key, reserved_bytes = reserved, "upload that died: its row removed and its reservation given back");
                if row_backend != backend {
                    tracing::warn!(%file_id, key, store = row_backend, "its bytes are in a store this process does not open: left");
                    continue;
                }
                if FileStore::file_id_of(&key) != Some(file_id) {
                    report.foreign_keys += 1;
                    tracing::warn!(%file_id, key, "the upload row names a key that is not its file's: left");
                    continue;
                }
                // Failing here is safe: no row and no event name the bytes now, so part 2 of this
                // pass or the next removes them.
                self.remove(&key, file_id, "upload_died", report).await;
            }
        }
    }

    /// Part 2: objects written before `before` that nothing names.
    async fn remove_unnamed(&self, before: DateTime<Utc>, report: &mut SweepReport) -> anyhow::Result<()> {
        let mut listed = self.store.list_before(before).try_chunks(PAGE);
        while let Some(page) = listed.next().await {
            let page: Vec<StoredObject> = page.map_err(|e| anyhow::anyhow!("cannot list the file store: {}", e.1))?;
            let mut ids = Vec::with_capacity(page.len());
            let mut keys = Vec::with_capacity(page.len());
            for object in page {
                match FileStore::file_id_of(&object.key) {
                    Some(id) => {
                        ids.push(id);
                        keys.push(object.key);
                    }
                    None => {
                        report.foreign_keys += 1;
                        tracing::warn!(key = object.key, "an object whose key the file store does not make: left");
                    }
                }
            }
            let unnamed: Vec<Uuid> = sqlx::query_scalar(
                "SELECT k.id FROM unnest($1::uuid[]) AS k(id) \
                 WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'File' AND e.aggregate_id = k.id::text) \
                   AND NOT EXISTS (SELECT 1 FROM file_uploads u WHERE u.file_id = k.id)",
            )
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
            let unnamed: HashSet<Uuid> = unnamed.into_iter().collect();
            report.objects_kept += (ids.len() - unnamed.len()) as u64;
            for (id, key) in ids.iter().zip(&keys) {
                if unnamed.contains(id) {
                    self.remove(key, *id, "unnamed", report).await;
                }
            }
        }
        Ok(())
    }

    /// Removes one object, counting and logging it; a failure is left for the next pass.
    async fn remove(&self, key: &str, file_id: Uuid, reason: &'static str, report: &mut SweepReport) {
        match self.store.delete(key).await {
            Ok(()) => {
                report.objects_removed += 1;
                metrics::counter!("cairn_files_orphans_removed_total", "reason" => reason).increment(1);
                tracing::info!(%file_id, key, reason, "orphaned file bytes removed");
            }
            Err(e) => {
                report.failures += 1;
                tracing::warn!(%file_id, key, reason, error = %e, "cannot remove orphaned file bytes; the next pass tries again");
            }
        }
    }
}
