//! Projection checkpoints, and waiting until a projection has applied a consistency token.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::envelope::ConsistencyToken;

/// The channel projectors notify, inside their transaction, when they advance. The payload is
/// `<projection> <tx>.<pos>` ([`notification`]), so a watcher needs no query to follow it.
pub const CHECKPOINT_CHANNEL: &str = "cairn_checkpoint";

/// The payload announcing that projection `name` reached `at`.
#[must_use]
pub fn notification(name: &str, at: ConsistencyToken) -> String {
    format!("{name} {at}")
}

/// Reads a [`notification`] payload.
fn parse_notification(payload: &str) -> Option<(&str, ConsistencyToken)> {
    let (name, at) = payload.split_once(' ')?;
    Some((name, at.parse().ok()?))
}

/// Reads the checkpoint of projection `name` (zero when it has applied nothing).
///
/// # Errors
/// When the query fails.
pub async fn read<'e>(executor: impl sqlx::PgExecutor<'e>, name: &str) -> sqlx::Result<ConsistencyToken> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT last_tx::text::bigint, last_pos FROM projection_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(executor)
            .await?;
    Ok(from_row(row))
}

/// The position of the newest committed event in the log (zero while it is empty): the furthest
/// any consistency token can name. One step down the `(transaction_id, global_position)` index.
///
/// # Errors
/// When the query fails.
pub async fn log_head<'e>(executor: impl sqlx::PgExecutor<'e>) -> sqlx::Result<ConsistencyToken> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM events \
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_optional(executor)
    .await?;
    Ok(from_row(row))
}

/// A stored `(transaction id, position)` pair as a token; zero when there is no row yet.
#[must_use]
pub fn from_row(row: Option<(i64, i64)>) -> ConsistencyToken {
    row.map_or_else(ConsistencyToken::default, |(tx, pos)| ConsistencyToken {
        tx: u64::try_from(tx).unwrap_or_default(),
        pos,
    })
}

/// Lag is counted exactly up to this many events, and reported as this beyond.
pub const LAG_COUNT_CAP: i64 = 1_000_000;

/// How many committed events lie past `after`, up to the log's head, counted up to
/// [`LAG_COUNT_CAP`]: the lag of a consumer whose checkpoint is `after`.
///
/// # Errors
/// When the query fails.
pub async fn events_after<'e>(executor: impl sqlx::PgExecutor<'e>, after: ConsistencyToken) -> sqlx::Result<i64> {
    // The ORDER BY keeps the count's generic plan (a prepared statement's) on the
    // (transaction_id, global_position) index instead of a scan of the whole log.
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events \
           WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
           ORDER BY transaction_id, global_position LIMIT $3) pending",
    )
    .bind(after.tx.to_string())
    .bind(after.pos)
    .bind(LAG_COUNT_CAP)
    .fetch_one(executor)
    .await
}

/// Follows one projection's checkpoint: woken by NOTIFY, with a slow poll as the fallback.
/// Reads that carry a consistency token wait on it instead of polling the database themselves.
#[derive(Clone)]
pub struct CheckpointWatcher {
    rx: watch::Receiver<ConsistencyToken>,
}

impl CheckpointWatcher {
    /// Starts following projection `name` until `shutdown`.
    #[must_use]
    pub fn spawn(pool: PgPool, name: &'static str, shutdown: CancellationToken) -> Self {
        let (tx, rx) = watch::channel(ConsistencyToken::default());
        tokio::spawn(async move {
            loop {
                if let Err(e) = follow(&pool, name, &tx, &shutdown).await {
                    tracing::warn!(error = %e, projection = name, "checkpoint watcher lost Postgres; retrying");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Self { rx }
    }

    /// The latest checkpoint seen.
    #[must_use]
    pub fn current(&self) -> ConsistencyToken {
        *self.rx.borrow()
    }

    /// Waits until the checkpoint reaches `token`, at most `timeout`. Returns whether it did.
    pub async fn wait_for(&self, token: ConsistencyToken, timeout: Duration) -> bool {
        let mut rx = self.rx.clone();
        tokio::time::timeout(timeout, rx.wait_for(|seen| *seen >= token)).await.is_ok_and(|r| r.is_ok())
    }
}

async fn follow(
    pool: &PgPool,
    name: &str,
    tx: &watch::Sender<ConsistencyToken>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let advance = |now: ConsistencyToken| {
        tx.send_if_modified(|seen| {
            let newer = now > *seen;
            if newer {
                *seen = now;
            }
            newer
        });
    };
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHECKPOINT_CHANNEL).await?;
    // Read after LISTEN, so no advance between the two is missed.
    advance(read(pool, name).await?);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            n = listener.recv() => {
                let n = n?;
                match parse_notification(n.payload()) {
                    Some((projection, at)) if projection == name => advance(at),
                    Some(_) => {}
                    // Not ours to parse (an older projector): read the checkpoint.
                    None => advance(read(pool, name).await?),
                }
            }
            // The fallback when a notification was lost with a dropped connection.
            () = tokio::time::sleep(Duration::from_secs(1)) => advance(read(pool, name).await?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_name_the_projection_and_its_position() {
        let at = ConsistencyToken { tx: 812, pos: 40 };
        let payload = notification("users", at);
        assert_eq!(parse_notification(&payload), Some(("users", at)));
        assert_eq!(parse_notification("users"), None);
        assert_eq!(parse_notification("users nonsense"), None);
    }
}
