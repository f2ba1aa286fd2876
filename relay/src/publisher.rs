//! The relay: the events table is the outbox. It tails the log in `(transaction_id,
//! global_position)` order, publishes each event to JetStream, waits for every PubAck, and only
//! then advances its checkpoint.
//!
//! - Gap safety comes from [`crate::reader::read_after`]: it never reads past the oldest running
//!   transaction, so an event whose transaction commits late is published, not skipped. When
//!   committed events wait behind such a transaction, [`crate::horizon`] names the backend that
//!   holds it (watch, gauges, a rate-limited warning).
//! - One active relay: a session-level advisory lock held on the relay's own connection. Others
//!   wait as hot standbys; when the holder dies its connection closes and the lock passes on. The
//!   checkpoint is written on the same connection, so a relay that lost its lock cannot write it.
//! - Take-over: a relay that has just obtained the lock reconciles its checkpoint with the
//!   stream before it publishes. It reads the stream's last message; if that event lies past the
//!   stored checkpoint (a batch was published, then the relay died before storing the
//!   checkpoint), the checkpoint moves there and is stored. Nothing is sent twice, however long
//!   ago the batch was published: this does not rely on the stream's duplicate window. An empty
//!   stream has nothing to reconcile; a stream whose last event lies *behind* the checkpoint
//!   (recreated, purged) is reported with a warning and the relay does not go back.
//! - Order: the first publish of every batch carries `Nats-Expected-Last-Sequence` (the stream's
//!   last sequence, known from the take-over and then from each PubAck), and every later one
//!   `Nats-Expected-Last-Msg-Id` of the event before it. If one publish of a pipelined batch
//!   fails, every later one fails too, so the stream never holds an event ahead of one that is
//!   missing, and nothing is appended behind a message this relay did not expect. The first
//!   publish is chained by sequence, not by message id, because a restarted nats-server (2.9)
//!   forgets the last message id once that message is older than the duplicate window, and would
//!   refuse an id-chained publish for ever; the sequence always survives a restart.
//! - Refusals: when JetStream refuses a chained publish (the stream's last message is not the one
//!   expected: another publisher, a stream recreated under the relay), the relay reconciles with
//!   the stream again and goes on from there, rather than retrying the same batch for ever.
//! - Duplicates: `Nats-Msg-Id = event_id` still lets the duplicate window drop an accidental
//!   re-send; consumers are idempotent by event id beyond it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishErrorKind, message::PublishMessage};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::checkpoint;
use crate::horizon::{self, HeldBack, HeldBackReport, Pending};
use crate::wakeup::{RelayWakeup, EVENTS_CHANNEL};
use cairn_platform::envelope::{ConsistencyToken, EventEnvelope};
use cairn_platform::nats::Namespace;

/// Publishes the event log to JetStream.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    ns: Namespace,
    batch: i64,
    idle_poll: Duration,
    wake: RelayWakeup,
    held_back: Arc<watch::Sender<Option<HeldBack>>>,
}

/// What the stream holds, as far as the active relay knows: the sequence of its last message
/// (0 while the stream has never stored one). The next batch is chained to it.
type StreamTip = u64;

impl Relay {
    /// A relay for `ns` publishing up to `batch` events per round.
    #[must_use]
    pub fn new(pool: PgPool, js: jetstream::Context, ns: Namespace, batch: i64) -> Self {
        Self {
            pool,
            js,
            ns,
            batch,
            idle_poll: Duration::from_millis(500),
            wake: RelayWakeup::local(),
            held_back: Arc::new(watch::channel(None).0),
        }
    }

    /// Also wakes on `wake`, which this process's commands signal after each commit (without it,
    /// only `NOTIFY cairn_events` and the idle poll wake the relay).
    #[must_use]
    pub fn with_wake(mut self, wake: RelayWakeup) -> Self {
        self.wake = wake;
        self
    }

    /// Whether this relay is held back, and by whom: `Some` while committed events wait behind a
    /// transaction still running, updated each time the relay looks again; `None` otherwise
    /// (also while it stands by).
    #[must_use]
    pub fn held_back(&self) -> watch::Receiver<Option<HeldBack>> {
        self.held_back.subscribe()
    }

    /// Runs until `shutdown`: waits for the lock, then publishes; on any failure starts over.
    /// Meanwhile it measures the relay's lag, whether it publishes or not.
    pub async fn run(self, shutdown: CancellationToken) {
        let sampling = shutdown.child_token();
        let _stop_sampling = sampling.clone().drop_guard();
        tokio::spawn(sample_lag(self.pool.clone(), self.ns.as_str().to_owned(), sampling));
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.run_once(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "relay interrupted");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The advisory-lock key of this namespace's relay.
    fn lock_key(&self) -> i64 {
        cairn_platform::db::advisory_key(&format!("cairn-relay:{}", self.ns.as_str()))
    }

    async fn run_once(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await.context("relay cannot reach Postgres")?.detach();
        let key = self.lock_key();
        let mut waiting_logged = false;
        loop {
            let got: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut conn).await?;
            if got {
                break;
            }
            if !waiting_logged {
                tracing::info!("another relay is active; standing by");
                waiting_logged = true;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!(namespace = self.ns.as_str(), "relay active");
        let result = self.publish_loop(&mut conn, shutdown).await;
        // Closing the connection releases the lock.
        let _ = conn.close().await;
        result
    }

    async fn publish_loop(&self, conn: &mut PgConnection, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(EVENTS_CHANNEL).await?;
        let mut woken = self.wake.subscribe();
        let stored = checkpoint::load(conn, self.ns.as_str()).await?;
        let (mut checkpoint, mut tip) = self.reconcile(conn, stored).await?;
        let mut report = HeldBackReport::new(Arc::clone(&self.held_back));
        let mut held_back_rounds = 0u32;
        let mut refusals = 0u32;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // Anything appended from here on wakes the waits below.
            woken.borrow_and_update();
            let events = crate::reader::read_after(conn, checkpoint, self.batch).await?;
            if events.is_empty() {
                // Committed events may be waiting behind an older transaction still running (the
                // safe horizon): look again soon rather than waiting for the next NOTIFY.
                if let Pending::HeldBack(holder) = horizon::pending(conn, checkpoint).await? {
                    report.held_back(holder);
                    // A transaction still running holds the horizon: look again when this process
                    // commits something (often the very transaction in the way), or after a pause
                    // that grows while a long transaction holds it.
                    held_back_rounds = (held_back_rounds + 1).min(6);
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        _ = woken.changed() => {}
                        () = tokio::time::sleep(Duration::from_millis(1 << held_back_rounds)) => {}
                    }
                    continue;
                }
                report.clear();
                held_back_rounds = 0;
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    n = listener.recv() => { n?; }
                    _ = woken.changed() => {}
                    () = tokio::time::sleep(self.idle_poll) => {}
                }
                continue;
            }
            report.clear();
            let Some(last_sequence) = self.publish_batch(&events, tip).await? else {
                // The stream's last message is not the one this relay published last: find out
                // what the stream holds and go on from there. Pause if it keeps happening.
                refusals += 1;
                tracing::warn!(
                    expected_last_sequence = tip,
                    refusals,
                    "JetStream refused a chained publish; reconciling with the stream"
                );
                if refusals > 1 {
                    let pause = Duration::from_millis(100 << (refusals - 2).min(5));
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                (checkpoint, tip) = self.reconcile(conn, checkpoint).await?;
                continue;
            };
            refusals = 0;
            tip = last_sequence;
            // The horizon moved: the next wait behind a running transaction starts short again.
            held_back_rounds = 0;
            let last = events.last().map(EventEnvelope::position).unwrap_or(checkpoint);
            checkpoint::store(conn, self.ns.as_str(), last).await?;
            checkpoint = last;
            metrics::counter!("cairn_relay_published_total").increment(events.len() as u64);
            metrics::gauge!("cairn_relay_checkpoint_position").set(last.pos as f64);
        }
    }

    /// Reconciles `checkpoint` with what the stream holds; returns the checkpoint to go on from
    /// (stored when it moved) and the stream's tip. Runs on take-over and after a refusal only,
    /// never per event.
    async fn reconcile(
        &self,
        conn: &mut PgConnection,
        checkpoint: ConsistencyToken,
    ) -> anyhow::Result<(ConsistencyToken, StreamTip)> {
        let name = self.ns.events_stream();
        let stream = self.js.get_stream(&name).await.with_context(|| format!("cannot read stream {name}"))?;
        let state = &stream.cached_info().state;
        let tip = state.last_sequence;
        if state.messages == 0 {
            // Never written, or everything in it removed: nothing to compare with.
            tracing::debug!(stream = name, tip, "stream holds no message; checkpoint kept");
            return Ok((checkpoint, tip));
        }
        let last = match stream.get_raw_message(tip).await {
            Ok(message) => message,
            Err(e) => {
                // Its last message was deleted: the sequence still chains the next publish.
                tracing::warn!(stream = name, tip, error = %e, "cannot read the stream's last message; checkpoint kept");
                return Ok((checkpoint, tip));
            }
        };
        let event: EventEnvelope = match serde_json::from_slice(&last.payload) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(stream = name, tip, error = %e, "the stream's last message is not an event; checkpoint kept");
                return Ok((checkpoint, tip));
            }
        };
        let Some(at) = checkpoint::position_in_log(conn, &event).await? else {
            tracing::warn!(
                stream = name,
                tip,
                event_id = %event.event_id,
                "the stream's last event is not in this event log; checkpoint kept"
            );
            return Ok((checkpoint, tip));
        };
        if at > checkpoint {
            // Published, then the relay stopped before it stored the checkpoint.
            checkpoint::store(conn, self.ns.as_str(), at).await?;
            tracing::info!(from = %checkpoint, to = %at, stream = name, "the stream already holds events past the checkpoint; checkpoint moved");
            Ok((at, tip))
        } else {
            if at < checkpoint {
                tracing::warn!(
                    checkpoint = %checkpoint,
                    stream_last = %at,
                    stream = name,
                    "the stream's last event is behind the relay's checkpoint (stream recreated or purged?); \
                     events in between are not published again"
                );
            }
            Ok((checkpoint, tip))
        }
    }

    /// Sends every event, chained to `tip` and to each other, then awaits every PubAck. Returns
    /// the sequence of the last message, or `None` when JetStream refused a chained publish (the
    /// stream does not end where this relay thinks). Any other failure fails the whole batch.
    async fn publish_batch(&self, events: &[EventEnvelope], tip: StreamTip) -> anyhow::Result<Option<u64>> {
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(events.len());
        let mut previous: Option<String> = None;
        for event in events {
            let id = event.event_id.to_string();
            let body = serde_json::to_vec(event)?;
            let mut message = PublishMessage::build().payload(body.into()).message_id(&id);
            message = match &previous {
                Some(prev) => message.expected_last_message_id(prev),
                // An empty stream has nothing to chain to (a zero expectation means none).
                None if tip > 0 => message.expected_last_sequence(tip),
                None => message,
            };
            let subject = self.ns.event_subject(&event.aggregate_type, &event.event_type);
            acks.push(self.js.send_publish(subject, message).await.context("publish to JetStream failed")?);
            previous = Some(id);
        }
        // Every ack is awaited, refused or not, so a reconciliation that follows sees the stream
        // after the whole batch, not in the middle of it.
        let mut last = tip;
        let mut refused = false;
        let mut failed = None;
        for ack in acks {
            match ack.await {
                Ok(ack) => last = ack.sequence,
                Err(e)
                    if matches!(
                        e.kind(),
                        PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
                    ) =>
                {
                    refused = true;
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if refused {
            return Ok(None);
        }
        if let Some(e) = failed {
            return Err(e).context("JetStream did not acknowledge a publish");
        }
        Ok(Some(last))
    }
}

/// How often the relay's lag gauge (`cairn_relay_lag_events`) is measured.
pub const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Sets `cairn_relay_lag_events` every [`LAG_SAMPLE_EVERY`] until `stop`: the committed events
/// past the stored checkpoint of namespace `ns`, counted up to
/// [`cairn_platform::checkpoint::LAG_COUNT_CAP`]. Measured apart from publishing, so the gauge
/// keeps counting while NATS is away or the relay stands by.
async fn sample_lag(pool: PgPool, ns: String, stop: CancellationToken) {
    loop {
        match checkpoint::read(&pool, &ns).await {
            Ok(at) => match cairn_platform::checkpoint::events_after(&pool, at).await {
                Ok(lag) => metrics::gauge!("cairn_relay_lag_events").set(lag as f64),
                Err(e) => tracing::debug!(error = %e, "cannot measure the relay's lag"),
            },
            Err(e) => tracing::debug!(error = %e, "cannot read the relay's checkpoint"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LAG_SAMPLE_EVERY) => {}
        }
    }
}
