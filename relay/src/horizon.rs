//! What holds the relay back: committed events it may not publish yet because an older
//! transaction is still running somewhere in the cluster.
//!
//! The relay never reads past `pg_snapshot_xmin(pg_current_snapshot())`, the oldest transaction
//! with an xid still running in the whole cluster, whatever its database. One forgotten open
//! transaction therefore stops every event behind it. When that happens the relay finds the
//! backend holding the oldest xid in `pg_stat_activity` and reports it: in a
//! [`watch`](tokio::sync::watch) of [`HeldBack`] ([`crate::Relay::held_back`]), in the gauges
//! `cairn_relay_held_back_seconds`, `cairn_relay_held_back_pid` and
//! `cairn_relay_held_back_transaction_seconds`, and in a warning naming the backend's pid,
//! transaction age and `application_name`, once it has held the relay for over
//! [`WARN_AFTER`], and at most once every [`WARN_EVERY`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgConnection;
use tokio::sync::watch;

use cairn_platform::envelope::ConsistencyToken;

/// How long the relay is held back before it warns.
pub const WARN_AFTER: Duration = Duration::from_secs(1);

/// The least time between two warnings.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// How much of the holder's current query is reported.
const QUERY_CHARS: i32 = 100;

/// The relay is held back: committed events wait behind a transaction still running.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldBack {
    /// How long the relay has been held back so far.
    pub held_for: Duration,
    /// The backend holding the oldest xid, when `pg_stat_activity` shows one (a prepared
    /// transaction holds the horizon without a backend).
    pub holder: Option<Holder>,
}

/// The backend whose transaction holds the relay back.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// Its process id (`pg_backend_pid()` on its connection).
    pub pid: i32,
    /// Its `application_name`: cairn's connections name their process and its pid.
    pub application_name: String,
    /// How long its transaction has been open.
    pub transaction_age: Duration,
    /// `active`, `idle in transaction`, …
    pub state: String,
    /// The start of its current (or last) statement.
    pub query: String,
}

/// Whether events past `checkpoint` wait behind the horizon, and if so, who holds it.
pub(crate) enum Pending {
    /// Nothing committed past the checkpoint: the relay is simply idle.
    Nothing,
    /// Committed events wait; the backend with the oldest xid, if any.
    HeldBack(Option<Holder>),
}

/// Called when a read past `checkpoint` returned nothing. One round trip; `pg_stat_activity` is
/// only scanned when events are waiting.
///
/// The test for a waiting event is an ordered `LIMIT 1`, not `EXISTS`: the statement is prepared,
/// and once Postgres switches it to a generic plan, `EXISTS` over the row comparison is planned
/// as a sequential scan that reads the whole log whenever nothing is waiting (tens of ms per
/// idle wake at 100k events, growing with the log); the ordered form always walks the
/// `(transaction_id, global_position)` index.
pub(crate) async fn pending(conn: &mut PgConnection, checkpoint: ConsistencyToken) -> sqlx::Result<Pending> {
    type Row = (bool, Option<i32>, Option<String>, Option<f64>, Option<String>, Option<String>);
    let (waiting, pid, application_name, age, state, query): Row = sqlx::query_as(
        "SELECT p.waiting, h.pid, h.application_name, \
                extract(epoch FROM clock_timestamp() - h.xact_start)::float8, h.state, left(h.query, $3) \
         FROM (SELECT coalesce((SELECT true FROM events \
                                WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
                                ORDER BY transaction_id, global_position LIMIT 1), false) AS waiting) p \
         LEFT JOIN LATERAL (SELECT pid, application_name, xact_start, state, query FROM pg_stat_activity \
                            WHERE p.waiting AND backend_xid IS NOT NULL \
                            ORDER BY age(backend_xid) DESC LIMIT 1) h ON true",
    )
    .bind(checkpoint.tx.to_string())
    .bind(checkpoint.pos)
    .bind(QUERY_CHARS)
    .fetch_one(conn)
    .await?;
    if !waiting {
        return Ok(Pending::Nothing);
    }
    Ok(Pending::HeldBack(pid.map(|pid| Holder {
        pid,
        application_name: application_name.unwrap_or_default(),
        transaction_age: Duration::try_from_secs_f64(age.unwrap_or_default()).unwrap_or_default(),
        state: state.unwrap_or_default(),
        query: query.unwrap_or_default(),
    })))
}

/// Whether to warn, held back for `held_for`, the last warning `since_warned` ago.
fn warning_due(held_for: Duration, since_warned: Option<Duration>) -> bool {
    held_for > WARN_AFTER && since_warned.is_none_or(|ago| ago >= WARN_EVERY)
}

/// Publishes the held-back state: watch, gauges, rate-limited warning.
/// Cleared when dropped: a relay that lost its lock or stopped is not held back.
pub(crate) struct HeldBackReport {
    tx: Arc<watch::Sender<Option<HeldBack>>>,
    since: Option<Instant>,
    warned: Option<Instant>,
}

impl HeldBackReport {
    pub(crate) fn new(tx: Arc<watch::Sender<Option<HeldBack>>>) -> Self {
        Self { tx, since: None, warned: None }
    }

    /// Still (or newly) held back, by `holder`.
    pub(crate) fn held_back(&mut self, holder: Option<Holder>) {
        let since = *self.since.get_or_insert_with(Instant::now);
        let held_for = since.elapsed();
        metrics::gauge!("cairn_relay_held_back_seconds").set(held_for.as_secs_f64());
        metrics::gauge!("cairn_relay_held_back_pid").set(holder.as_ref().map_or(0.0, |h| f64::from(h.pid)));
        metrics::gauge!("cairn_relay_held_back_transaction_seconds")
            .set(holder.as_ref().map_or(0.0, |h| h.transaction_age.as_secs_f64()));
        if warning_due(held_for, self.warned.map(|at| at.elapsed())) {
            self.warned = Some(Instant::now());
            match &holder {
                Some(h) => tracing::warn!(
                    held_for_ms = held_for.as_millis() as u64,
                    pid = h.pid,
                    application_name = %h.application_name,
                    transaction_age_ms = h.transaction_age.as_millis() as u64,
                    state = %h.state,
                    query = %h.query,
                    "relay held back by a transaction still running; committed events wait behind it"
                ),
                None => tracing::warn!(
                    held_for_ms = held_for.as_millis() as u64,
                    "relay held back by a transaction without a backend (a prepared transaction?)"
                ),
            }
        }
        self.tx.send_replace(Some(HeldBack { held_for, holder }));
    }

    /// No longer held back (published, or idle).
    pub(crate) fn clear(&mut self) {
        if self.since.take().is_some() {
            metrics::gauge!("cairn_relay_held_back_seconds").set(0.0);
            metrics::gauge!("cairn_relay_held_back_pid").set(0.0);
            metrics::gauge!("cairn_relay_held_back_transaction_seconds").set(0.0);
            self.tx.send_replace(None);
        }
    }
}

impl Drop for HeldBackReport {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_only_after_a_second_held_back_and_at_most_every_ten_seconds() {
        let ms = Duration::from_millis;
        assert!(!warning_due(ms(900), None), "a short hold is normal under load");
        assert!(warning_due(ms(1_100), None));
        assert!(!warning_due(ms(30_000), Some(ms(9_000))));
        assert!(warning_due(ms(30_000), Some(ms(10_000))));
    }
}
