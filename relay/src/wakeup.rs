//! Waking the relay when events commit.
//!
//! Commands signal after their transaction has committed, never inside it: a `NOTIFY` sent in a
//! transaction takes a cluster-wide lock at commit, which would serialise every command's commit
//! behind every other's. The relay in the same process is woken through a watch channel; relays in
//! other processes through one `NOTIFY cairn_events` sent on its own, with at most one in flight
//! per process (signals that arrive meanwhile are folded into the next one). The relay also polls
//! when idle, so an event appended by anything else (a script, another tool) is published too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::watch;

/// The channel the relay listens on.
pub const EVENTS_CHANNEL: &str = "cairn_events";

/// Signals that events were appended.
#[derive(Clone)]
pub struct RelayWakeup {
    inner: Arc<Inner>,
}

struct Inner {
    tx: watch::Sender<u64>,
    pool: Option<PgPool>,
    sending: AtomicBool,
    again: AtomicBool,
}

impl RelayWakeup {
    /// Wakes this process's relay and, through `NOTIFY` on `pool`, relays in other processes.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self::build(Some(pool))
    }

    /// Wakes this process's relay only.
    #[must_use]
    pub fn local() -> Self {
        Self::build(None)
    }

    fn build(pool: Option<PgPool>) -> Self {
        let (tx, _) = watch::channel(0);
        Self { inner: Arc::new(Inner { tx, pool, sending: AtomicBool::new(false), again: AtomicBool::new(false) }) }
    }

    /// Events were committed: wake the relays. Returns at once; the `NOTIFY` is sent in the background.
    pub fn appended(&self) {
        self.inner.tx.send_modify(|n| *n = n.wrapping_add(1));
        let Some(pool) = self.inner.pool.clone() else { return };
        self.inner.again.store(true, Ordering::SeqCst);
        if self.inner.sending.swap(true, Ordering::SeqCst) {
            return; // the sender in flight sends once more for us
        }
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            loop {
                inner.again.store(false, Ordering::SeqCst);
                if let Err(e) = notify(&pool).await {
                    tracing::debug!(error = %e, "cannot notify other relays; they poll");
                }
                inner.sending.store(false, Ordering::SeqCst);
                if !inner.again.load(Ordering::SeqCst) || inner.sending.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }

    /// A receiver that sees a change after each [`RelayWakeup::appended`].
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.tx.subscribe()
    }
}

/// Sends `NOTIFY cairn_events` in a transaction of its own.
///
/// # Errors
/// When Postgres cannot be reached.
pub async fn notify(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, '')").bind(EVENTS_CHANNEL).execute(pool).await.map(|_| ())
}
