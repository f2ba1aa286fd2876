//! The claim a worker holds on one event while it mails it, so two worker processes never mail
//! the same event at once.
//!
//! A session-level advisory lock (`pg_try_advisory_lock`) on a pooled connection of its own, held
//! with no transaction open. Advisory locks take no transaction id, so holding one across the SMTP
//! exchange does not hold back the relay's horizon (only running transactions with an id do).
//! A claim row with a lease would work too, but needs a table, a clock and an expiry; the lock
//! goes away by itself with its connection, which is exactly what a crashed or stopped process
//! should leave behind.
//!
//! The lock must never outlive the claim on a connection the pool hands to someone else: a claim
//! released cleanly unlocks and returns its connection; a claim dropped any other way (an error
//! while unlocking, the task aborted at shutdown, a panic) closes its connection instead, and
//! Postgres drops the lock with the session.

use std::time::{Duration, Instant};

use cairn_platform::failure::transient;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use uuid::Uuid;

/// First key of the two-key advisory locks this worker takes, so they never meet other locks
/// (the single-key form the relay uses lives in a different key space anyway). ASCII "mail".
const LOCK_CLASS: i32 = 0x6d61_696c;

/// How often a claim held elsewhere is tried again. Contention only happens when two processes
/// were handed the same redelivered batch, so a short poll costs nothing in the common case.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// A held claim on one event. Release it with [`EventClaim::release`]; dropping it otherwise
/// closes its connection, which releases the lock too.
pub(super) struct EventClaim {
    conn: PoolConnection<Postgres>,
    /// Whether the connection is known to hold no lock of ours and may go back to the pool.
    clean: bool,
}

impl EventClaim {
    /// Claims `event_id`, waiting up to `patience` while another worker holds it.
    ///
    /// # Errors
    /// When Postgres fails, or (marked transient) when the other worker keeps it past `patience`.
    pub(super) async fn take(pool: &PgPool, event_id: Uuid, patience: Duration) -> anyhow::Result<Self> {
        // Constructed before the first try: if that try is cancelled once the server granted the
        // lock, the drop closes the connection rather than pooling it with the lock held.
        let mut claim = Self { conn: pool.acquire().await?, clean: false };
        let deadline = Instant::now() + patience;
        loop {
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(LOCK_CLASS)
                .bind(lock_key(event_id))
                .fetch_one(&mut *claim.conn)
                .await?;
            if held {
                return Ok(claim);
            }
            if Instant::now() >= deadline {
                // Every try answered "no": nothing of ours is locked on this connection.
                claim.clean = true;
                return Err(transient(anyhow::anyhow!(
                    "another worker has been mailing event {event_id} for over {patience:?}"
                )));
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// The claim's connection, for the worker's own statements (each its own transaction).
    pub(super) fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Unlocks and returns the connection to the pool; on any failure the connection is closed,
    /// which unlocks too.
    pub(super) async fn release(mut self, event_id: Uuid) {
        let unlocked = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1, $2)")
            .bind(LOCK_CLASS)
            .bind(lock_key(event_id))
            .fetch_one(&mut *self.conn)
            .await;
        match unlocked {
            Ok(true) => self.clean = true,
            Ok(false) => tracing::warn!(%event_id, "mail claim was not held at release; closing its connection"),
            Err(e) => tracing::warn!(%event_id, error = %e, "cannot release the mail claim; closing its connection"),
        }
    }
}

impl Drop for EventClaim {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
        }
    }
}

/// Second key of the event's advisory lock. Two events sharing it only wait for each other.
fn lock_key(event_id: Uuid) -> i32 {
    let b = event_id.as_bytes();
    i32::from_be_bytes([b[12], b[13], b[14], b[15]])
}
