//! `sessions.purge`: removes from the `sessions` read model the sessions that ended (expired,
//! idle past `CAIRN_SESSION_IDLE_SECS`, or revoked) more than `CAIRN_SESSIONS_PURGE_AFTER_HOURS`
//! ago, by the process's clock.
//!
//! It deletes in batches of [`BATCH`] rows, each its own statement, so no transaction is held for
//! long and the projector writing the same table is never kept waiting. The log keeps every
//! session event, so nothing is lost: the read model only stops listing sessions no one can use.
//! A later event for a purged session (a revocation of every session of a user, say) updates no
//! row and inserts none, so it neither fails nor brings the row back.

use std::time::Duration;

use anyhow::anyhow;
use cairn_platform::jobs::kinds::SESSIONS_PURGE;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::PgPool;

use crate::jobs::{JobContext, JobError, JobHandler};

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

/// The `sessions.purge` handler.
#[derive(Debug, Clone, Copy)]
pub struct SessionsPurge {
    after: Duration,
    idle: Duration,
}

impl SessionsPurge {
    /// Purges sessions ended more than `after` ago; a session unused for `idle` has ended.
    #[must_use]
    pub fn new(after: Duration, idle: Duration) -> Self {
        Self { after, idle }
    }

    /// Deletes every session ended before `now − after`, batch by batch, and returns how many
    /// went. Stops between two batches when `stop` says so.
    ///
    /// # Errors
    /// Database errors; the batches already deleted stay deleted.
    pub async fn purge(&self, pool: &PgPool, now: DateTime<Utc>, stop: impl Fn() -> bool) -> anyhow::Result<u64> {
        let before = now - chrono::Duration::from_std(self.after)?;
        let idle = chrono::Duration::from_std(self.idle)?;
        let mut purged = 0;
        loop {
            let deleted = sqlx::query(
                "DELETE FROM sessions WHERE id IN ( \
                     SELECT id FROM sessions \
                     WHERE expires_at < $1 OR revoked_at < $1 OR last_used_at + make_interval(secs => $2) < $1 \
                     LIMIT $3)",
            )
            .bind(before)
            .bind(idle.num_seconds() as f64)
            .bind(BATCH)
            .execute(pool)
            .await?
            .rows_affected();
            purged += deleted;
            if deleted < BATCH as u64 || stop() {
                return Ok(purged);
            }
        }
    }
}

impl JobHandler for SessionsPurge {
    fn kind(&self) -> &'static str {
        SESSIONS_PURGE
    }

    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            let purged = self
                .purge(&job.pool, job.clock.now(), || job.cancel.is_cancelled())
                .await
                .map_err(|e| JobError::Retry(e.context("cannot purge ended sessions")))?;
            metrics::counter!("cairn_sessions_purged_total").increment(purged);
            if job.cancel.is_cancelled() {
                return Err(JobError::Retry(anyhow!(
                    "stopped after purging {purged} sessions; the rest is left for the next run"
                )));
            }
            if purged > 0 {
                tracing::info!(job_id = %job.id, purged, "ended sessions purged from the read model");
            }
            Ok(())
        })
    }
}
