//! The checkpointed apply loop every projection shares, and parking.
//!
//! A batch is applied whole in one transaction with the checkpoint. If it fails for a reason that
//! will pass (Postgres restarting), the batch is retried as it is. If it fails for a reason of its
//! own (a payload this release cannot read, a row a rule refuses), it is applied again one event
//! at a time, each behind a savepoint: the events that fail are parked (`parked_events`), and the
//! rest, with the checkpoint past all of them, commit. So one bad event never wedges a projection.
//!
//! The transaction holds no row lock while it works: the projection's writers are serialised by
//! a transaction-scoped advisory lock, which takes no transaction id, and the first write comes
//! late in the batch. A transaction id held open would hold back the relay's horizon.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cairn_domain::upcast;
use cairn_platform::checkpoint::{self, CHECKPOINT_CHANNEL};
use cairn_platform::envelope::{ConsistencyToken, EventEnvelope};
use cairn_platform::failure::is_transient;
use cairn_platform::nats::{self, EventBatchHandler, Namespace};
use cairn_platform::parking::{self, Control};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// A read model built from events.
pub trait Projection: Send + Sync + Clone + 'static {
    /// Checkpoint and consumer name.
    const NAME: &'static str;
    /// The tables it owns, swapped together by a rebuild.
    const TABLES: &'static [&'static str];

    /// Whether `event` can change this read model. The others are passed over undecoded, and a
    /// batch of nothing else costs one statement (or nothing, while more are on their way).
    fn wants(&self, event: &EventEnvelope) -> bool;

    /// Applies one event to the tables in `schema`. Called inside the batch's transaction, with
    /// events this projection [`wants`](Projection::wants), already upcast to the current shape.
    fn apply(
        &self,
        conn: &mut PgConnection,
        schema: &str,
        event: &EventEnvelope,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Applies `events`, in order, to the tables in `schema`. Called inside the batch's
    /// transaction. By default one [`Projection::apply`] each; a projection that sees many events
    /// folds them and writes each changed row once.
    fn apply_batch(
        &self,
        conn: &mut PgConnection,
        schema: &str,
        events: &[&EventEnvelope],
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        async move {
            for event in events {
                self.apply(conn, schema, event).await?;
            }
            Ok(())
        }
    }
}

/// How long a run of events no projection wants may go unrecorded while more keep coming.
const PASS_OVER_FLUSH: Duration = Duration::from_millis(200);

/// Events passed over (none wanted) since the stored checkpoint `base`, up to `reached`.
#[derive(Debug, Clone, Copy)]
struct PassedOver {
    base: ConsistencyToken,
    reached: ConsistencyToken,
    since: Instant,
}

struct Checkpointed<P: Projection> {
    pool: PgPool,
    projection: P,
    passed_over: Mutex<Option<PassedOver>>,
}

impl<P: Projection> EventBatchHandler for Checkpointed<P> {
    async fn handle(&self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        self.handle_hinted(events, true).await
    }

    async fn handle_hinted(&self, events: &[EventEnvelope], caught_up: bool) -> anyhow::Result<()> {
        if self.pass_over(events, caught_up).await? {
            return Ok(());
        }
        match self.apply_in_transaction(events, false).await {
            Err(e) if !is_transient(&e) => {
                tracing::warn!(projection = P::NAME, error = %cairn_platform::http::loggable(e.as_ref()), "batch refused; applying it one event at a time");
                self.apply_in_transaction(events, true).await
            }
            other => other,
        }
    }

    fn parks_itself(&self) -> bool {
        true
    }

    fn checkpoint(&self) -> Option<&'static str> {
        Some(P::NAME)
    }
}

impl<P: Projection> Checkpointed<P> {
    /// Handles a batch this projection wants nothing of without a transaction: the checkpoint
    /// moves by one compare-and-set statement when the consumer has caught up (or the run is
    /// getting old), and not at all meanwhile. Returns false when the batch needs the full path.
    ///
    /// Events acknowledged here but never recorded (a crash, a lost compare-and-set) are not
    /// lost: the next event's predecessor is then past the checkpoint, and the gap is filled from
    /// the events table.
    async fn pass_over(&self, events: &[EventEnvelope], caught_up: bool) -> anyhow::Result<bool> {
        let Some(first) = events.first() else { return Ok(true) };
        let chained = events.windows(2).all(|w| w[1].previous() == w[0].position());
        if !chained || events.iter().any(|e| self.projection.wants(e) || parking::control(e, P::NAME).is_some()) {
            return Ok(false);
        }
        let last = events.last().map_or(first.position(), EventEnvelope::position);
        let run = {
            let mut guard = self.passed_over.lock().map_err(|_| anyhow::anyhow!("pass-over state poisoned"))?;
            let run = match *guard {
                Some(run) if first.previous() == run.reached => PassedOver { reached: last, ..run },
                Some(_) => return Ok(false), // not where the run ended: let the full path sort it out
                None => PassedOver { base: first.previous(), reached: last, since: Instant::now() },
            };
            *guard = Some(run);
            run
        };
        if !caught_up && run.since.elapsed() < PASS_OVER_FLUSH {
            return Ok(true);
        }
        self.take_passed_over();
        let moved = compare_and_set_checkpoint(&self.pool, P::NAME, run.base, run.reached).await?;
        // Stored elsewhere (another process, or nothing stored yet): the full path decides.
        Ok(moved)
    }

    fn take_passed_over(&self) -> Option<PassedOver> {
        self.passed_over.lock().ok().and_then(|mut guard| guard.take())
    }

    /// Applies `events` and advances the checkpoint in one transaction; `one_by_one` parks what
    /// fails instead of failing the batch.
    async fn apply_in_transaction(&self, events: &[EventEnvelope], one_by_one: bool) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        lock_projection(&mut tx, P::NAME).await?;
        let start = checkpoint::read(&mut *tx, P::NAME).await?;
        let mut at = start;
        if let Some(run) = self.take_passed_over() {
            if run.base == start {
                at = run.reached; // everything up to there was passed over: nothing to apply
            }
        }
        let mut pending: Vec<&EventEnvelope> = Vec::with_capacity(events.len());
        for event in events {
            if event.position() <= at {
                continue; // delivered twice: already applied
            }
            if event.previous() > at {
                // Its predecessor has not been applied: take the missing events from the log.
                apply_run(&mut tx, &self.projection, "public", &pending, one_by_one).await?;
                pending.clear();
                fill_gap(&mut tx, &self.projection, "public", at, event.previous(), one_by_one).await?;
            }
            pending.push(event);
            at = event.position();
        }
        apply_run(&mut tx, &self.projection, "public", &pending, one_by_one).await?;
        if at != start {
            save_checkpoint(&mut tx, P::NAME, at).await?;
        }
        tx.commit().await?;
        metrics::gauge!("cairn_projector_checkpoint_position", "projection" => P::NAME).set(at.pos as f64);
        Ok(())
    }
}

/// `event` in the current shape of its type (upcast when stored under an older version).
fn current_shape(event: &EventEnvelope) -> Cow<'_, EventEnvelope> {
    if !upcast::needs_upcast(&event.event_type, &event.event_version) {
        return Cow::Borrowed(event);
    }
    let mut current = event.clone();
    let (payload, version) = upcast::upcast(&event.event_type, &event.event_version, current.payload.take());
    current.payload = payload;
    current.event_version = version;
    Cow::Owned(current)
}

/// Applies a run of events in order: those the projection wants, upcast, and the operators'
/// decisions addressed to it. With `one_by_one`, each event goes behind a savepoint and one that
/// fails for a reason of its own is parked.
pub(crate) async fn apply_run<P: Projection>(
    conn: &mut PgConnection,
    projection: &P,
    schema: &str,
    events: &[&EventEnvelope],
    one_by_one: bool,
) -> anyhow::Result<()> {
    let mut wanted: Vec<Cow<'_, EventEnvelope>> = Vec::new();
    for event in events {
        if let Some(decision) = parking::control(event, P::NAME) {
            flush(conn, projection, schema, &mut wanted, one_by_one).await?;
            decide(conn, projection, schema, decision).await?;
        } else if projection.wants(event) {
            wanted.push(current_shape(event));
        }
    }
    flush(conn, projection, schema, &mut wanted, one_by_one).await
}

async fn flush<P: Projection>(
    conn: &mut PgConnection,
    projection: &P,
    schema: &str,
    wanted: &mut Vec<Cow<'_, EventEnvelope>>,
    one_by_one: bool,
) -> anyhow::Result<()> {
    if wanted.is_empty() {
        return Ok(());
    }
    if one_by_one {
        for event in wanted.iter() {
            if let Err(e) = try_apply(conn, projection, schema, event).await? {
                parking::park(&mut *conn, P::NAME, event, &e).await?;
            }
        }
    } else {
        let refs: Vec<&EventEnvelope> = wanted.iter().map(AsRef::as_ref).collect();
        projection.apply_batch(conn, schema, &refs).await?;
    }
    wanted.clear();
    Ok(())
}

/// Applies one event behind a savepoint. The outer error is transient (give up the batch); the
/// inner one is the event's own, with its changes rolled back.
async fn try_apply<P: Projection>(
    conn: &mut PgConnection,
    projection: &P,
    schema: &str,
    event: &EventEnvelope,
) -> anyhow::Result<Result<(), anyhow::Error>> {
    sqlx::query("SAVEPOINT apply_one").execute(&mut *conn).await?;
    match projection.apply_batch(conn, schema, &[event]).await {
        Ok(()) => {
            sqlx::query("RELEASE SAVEPOINT apply_one").execute(&mut *conn).await?;
            Ok(Ok(()))
        }
        Err(e) if is_transient(&e) => Err(e),
        Err(e) => {
            sqlx::query("ROLLBACK TO SAVEPOINT apply_one").execute(&mut *conn).await?;
            Ok(Err(e))
        }
    }
}

/// Carries out an operator's decision about an event this projection parked.
async fn decide<P: Projection>(
    conn: &mut PgConnection,
    projection: &P,
    schema: &str,
    decision: Control,
) -> anyhow::Result<()> {
    match decision {
        Control::Skip(event_id) => parking::skipped(&mut *conn, P::NAME, event_id).await?,
        Control::Retry(event_id) => {
            if !parking::is_parked(&mut *conn, P::NAME, event_id).await? {
                return Ok(());
            }
            let Some(event) = cairn_platform::envelope::load(&mut *conn, event_id).await? else {
                return Ok(());
            };
            match try_apply(conn, projection, schema, &current_shape(&event)).await? {
                Ok(()) => parking::resolved(&mut *conn, P::NAME, event_id).await?,
                Err(e) => parking::park(&mut *conn, P::NAME, &event, &e).await?,
            }
        }
    }
    Ok(())
}

/// Serialises the writers of projection `name` (live batches, a rebuild's final swap) for the
/// rest of the transaction. An advisory lock, not a row lock: it takes no transaction id.
pub(crate) async fn lock_projection(conn: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(cairn_platform::db::advisory_key(&format!("cairn-projection:{name}")))
        .execute(conn)
        .await?;
    Ok(())
}

/// Advances projection `name`'s checkpoint to `at` and announces it, in one statement.
pub(crate) async fn save_checkpoint(conn: &mut PgConnection, name: &str, at: ConsistencyToken) -> sqlx::Result<()> {
    sqlx::query(
        "WITH saved AS (INSERT INTO projection_checkpoints AS c (name, last_tx, last_pos) VALUES ($1, $2::text::xid8, $3) \
                        ON CONFLICT (name) DO UPDATE SET last_tx = EXCLUDED.last_tx, last_pos = EXCLUDED.last_pos, \
                                                         updated_at = now() \
                        RETURNING name) \
         SELECT pg_notify($4, $5) FROM saved",
    )
    .bind(name)
    .bind(at.tx.to_string())
    .bind(at.pos)
    .bind(CHECKPOINT_CHANNEL)
    .bind(checkpoint::notification(name, at))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves projection `name`'s checkpoint from `from` to `to`, only if it is at `from`, and
/// announces it. Returns whether it moved.
async fn compare_and_set_checkpoint(
    pool: &PgPool,
    name: &str,
    from: ConsistencyToken,
    to: ConsistencyToken,
) -> sqlx::Result<bool> {
    let moved = sqlx::query(
        "WITH saved AS (UPDATE projection_checkpoints SET last_tx = $4::text::xid8, last_pos = $5, updated_at = now() \
                        WHERE name = $1 AND last_tx = $2::text::xid8 AND last_pos = $3 RETURNING name) \
         SELECT pg_notify($6, $7) FROM saved",
    )
    .bind(name)
    .bind(from.tx.to_string())
    .bind(from.pos)
    .bind(to.tx.to_string())
    .bind(to.pos)
    .bind(CHECKPOINT_CHANNEL)
    .bind(checkpoint::notification(name, to))
    .execute(pool)
    .await?
    .rows_affected();
    Ok(moved > 0)
}

/// Applies the log's events after `from` up to and including `to`.
async fn fill_gap<P: Projection>(
    conn: &mut PgConnection,
    projection: &P,
    schema: &str,
    from: ConsistencyToken,
    to: ConsistencyToken,
    one_by_one: bool,
) -> anyhow::Result<()> {
    let mut at = from;
    while at < to {
        let events = cairn_relay::reader::read_after(conn, at, 1000).await?;
        if events.is_empty() {
            // The relay published past what this transaction sees: look again shortly.
            return Err(cairn_platform::failure::transient(anyhow::anyhow!(
                "gap after {at} up to {to} is not in the events table yet"
            )));
        }
        let batch: Vec<&EventEnvelope> = events.iter().take_while(|e| e.position() <= to).collect();
        apply_run(conn, projection, schema, &batch, one_by_one).await?;
        at = batch.last().map_or(to, |e| e.position());
    }
    tracing::info!(projection = P::NAME, from = %from, to = %to, "filled a gap from the events table");
    Ok(())
}

/// Runs projection `P` as a durable consumer until `shutdown`.
///
/// # Errors
/// When the consumer cannot be created.
pub async fn run<P: Projection>(
    pool: PgPool,
    js: jetstream::Context,
    ns: Namespace,
    projection: P,
    batch: usize,
    replicas: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stream = nats::ensure_events_stream(&js, &ns, replicas).await?;
    let consumer = nats::ensure_durable_consumer(&stream, &format!("projector_{}", P::NAME)).await?;
    tracing::info!(projection = P::NAME, "projector running");
    let handler = Checkpointed { pool: pool.clone(), projection, passed_over: Mutex::new(None) };
    nats::consume(consumer, batch, handler, P::NAME, pool, shutdown).await;
    Ok(())
}
