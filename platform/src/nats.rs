//! JetStream wiring: namespaced names, the EVENTS stream, durable consumers and the loop that
//! feeds them, with parking of what a consumer cannot apply.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};

use crate::failure::is_transient;

/// Names of every stream, subject and consumer, prefixed by `CAIRN_NAMESPACE` so several
/// deployments (and parallel tests) share one NATS server without seeing each other's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(String);

impl Namespace {
    /// A namespace; empty means none.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self(name.to_owned())
    }

    /// The EVENTS stream: `EVENTS`, or `<NS>_EVENTS`.
    #[must_use]
    pub fn events_stream(&self) -> String {
        if self.0.is_empty() {
            "EVENTS".to_owned()
        } else {
            format!("{}_EVENTS", self.0.to_uppercase().replace('-', "_"))
        }
    }

    /// The subject of one event: `[<ns>.]events.<aggregate_type>.<event_type>`.
    #[must_use]
    pub fn event_subject(&self, aggregate_type: &str, event_type: &str) -> String {
        format!("{}.{aggregate_type}.{event_type}", self.events_prefix())
    }

    /// Wildcard over every event subject.
    #[must_use]
    pub fn all_events(&self) -> String {
        format!("{}.>", self.events_prefix())
    }

    fn events_prefix(&self) -> String {
        if self.0.is_empty() {
            "events".to_owned()
        } else {
            format!("{}.events", self.0)
        }
    }

    /// The name as configured, for checkpoint rows and lock keys.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Connects to NATS, retrying for ever in the background when the server is down
/// (commands keep working; the relay catches up when NATS returns).
///
/// # Errors
/// When the URL is malformed.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .name("cairn")
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))
}

/// Creates (or finds) the EVENTS stream of `ns`.
///
/// # Errors
/// When JetStream is unavailable or the stream cannot be created.
pub async fn ensure_events_stream(
    js: &jetstream::Context,
    ns: &Namespace,
    replicas: usize,
) -> anyhow::Result<stream::Stream> {
    js.get_or_create_stream(stream::Config {
        name: ns.events_stream(),
        subjects: vec![ns.all_events()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        // The relay re-sends after a crash; JetStream drops copies within this window by Nats-Msg-Id,
        // and consumers are idempotent by event id beyond it.
        duplicate_window: Duration::from_secs(600),
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot create JetStream stream {}: {e}", ns.events_stream()))
}

/// Creates (or finds) a durable pull consumer on the EVENTS stream.
///
/// # Errors
/// When JetStream refuses.
pub async fn ensure_durable_consumer(
    stream: &stream::Stream,
    name: &str,
) -> anyhow::Result<consumer::Consumer<consumer::pull::Config>> {
    stream
        .get_or_create_consumer(
            name,
            consumer::pull::Config {
                durable_name: Some(name.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::All,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot create JetStream consumer {name}: {e}"))
}

/// Handles batches of events from a durable consumer.
pub trait EventBatchHandler: Send + Sync {
    /// Applies a batch. Must be idempotent: a batch may be delivered again after a crash.
    ///
    /// # Errors
    /// A failure marked transient ([`crate::failure::is_transient`]) has the batch retried as it
    /// is; any other has it applied one event at a time, and the events that keep failing parked.
    fn handle(
        &self,
        events: &[crate::envelope::EventEnvelope],
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;

    /// As [`EventBatchHandler::handle`], told whether the consumer has caught up with the stream
    /// (nothing more is waiting), which lets a handler put off work that can wait for company.
    ///
    /// # Errors
    /// As [`EventBatchHandler::handle`].
    fn handle_hinted(
        &self,
        events: &[crate::envelope::EventEnvelope],
        caught_up: bool,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send {
        let _ = caught_up;
        self.handle(events)
    }

    /// Whether the handler parks what it cannot apply and carries out operators' decisions
    /// itself, in its own transactions (projections do). Otherwise the consumer loop does both.
    fn parks_itself(&self) -> bool {
        false
    }

    /// The name of the checkpoint (in `projection_checkpoints`) the handler stores with what it
    /// applies, if it keeps one (projections do). The consumer's lag is counted from it;
    /// otherwise from the position of the last event this consumer loop applied.
    fn checkpoint(&self) -> Option<&'static str> {
        None
    }
}

/// Pulls batches from `consumer` and hands them to `handler`; acknowledges only after the
/// handler succeeded (at-least-once delivery; handlers make the effect exactly-once). Runs until
/// `shutdown`, riding out NATS outages.
///
/// Messages arrive through one continuous pull (the server pushes each as soon as it is stored,
/// up to `batch` ahead of the acknowledgements); a batch is whatever has arrived when the previous
/// one is done, up to `batch`, so a quiet stream is applied one event at a time at once and a
/// busy one in full batches.
///
/// Nothing is retried for ever because of one event: a batch refused for a reason of its own is
/// applied one event at a time, and an event refused [`ATTEMPTS`] times is parked under `name` in
/// `pool` ([`crate::parking`]); operators' retries and skips addressed to `name` are carried out
/// here (unless the handler [parks itself](EventBatchHandler::parks_itself)).
pub async fn consume<H: EventBatchHandler>(
    consumer: consumer::Consumer<consumer::pull::Config>,
    batch: usize,
    handler: H,
    name: &'static str,
    pool: sqlx::PgPool,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let checkpoint = handler.checkpoint();
    let handler = Parking { handler, name, pool, applied: std::sync::Arc::default() };
    // The lag gauge is measured on its own, so it keeps telling the truth while this loop waits
    // (NATS away, a batch retried, a projection held back).
    let sampling = shutdown.child_token();
    let _stop_sampling = sampling.clone().drop_guard();
    tokio::spawn(sample_lag(handler.pool.clone(), name, checkpoint, std::sync::Arc::clone(&handler.applied), sampling));
    let mut backoff = Backoff::new();
    while !shutdown.is_cancelled() {
        let pulled = consumer
            .stream()
            .max_messages_per_batch(batch.max(1))
            .expires(Duration::from_secs(10))
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await;
        match pulled {
            Ok(messages) => {
                if let Err(e) = consume_stream(messages, batch.max(1), &handler, name, &shutdown).await {
                    tracing::warn!(consumer = name, error = %e, "pull interrupted; pulling again");
                } else {
                    return;
                }
            }
            Err(e) => tracing::warn!(consumer = name, error = %e, "pull failed; retrying"),
        }
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

/// Applies batches from one pull until `shutdown` (`Ok`) or until the pull breaks (`Err`).
async fn consume_stream<H: EventBatchHandler>(
    mut messages: consumer::pull::Stream,
    batch: usize,
    handler: &Parking<H>,
    name: &'static str,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use futures::{FutureExt, StreamExt};
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = messages.next() => next,
        };
        let mut delivered = Vec::with_capacity(batch);
        let mut broken = None;
        match first {
            None => anyhow::bail!("the pull ended"),
            Some(Err(e)) => anyhow::bail!("{e}"),
            Some(Ok(message)) => delivered.push(message),
        }
        // Take whatever else has already arrived, without waiting for more.
        while delivered.len() < batch {
            match messages.next().now_or_never() {
                Some(Some(Ok(message))) => delivered.push(message),
                Some(Some(Err(e))) => {
                    broken = Some(anyhow::anyhow!("{e}"));
                    break;
                }
                Some(None) => {
                    broken = Some(anyhow::anyhow!("the pull ended"));
                    break;
                }
                None => break,
            }
        }
        let mut events = Vec::with_capacity(delivered.len());
        let mut applicable = Vec::with_capacity(delivered.len());
        for message in delivered {
            match serde_json::from_slice::<crate::envelope::EventEnvelope>(&message.payload) {
                Ok(event) => {
                    events.push(event);
                    applicable.push(message);
                }
                Err(e) => {
                    // Not an event envelope: it can never be applied, so it must not block the stream.
                    tracing::error!(consumer = name, subject = %message.subject, error = %e, "dropping malformed message");
                    let _ = message.ack_with(jetstream::AckKind::Term).await;
                }
            }
        }
        if let Some(first) = events.first() {
            // Until this loop has applied something, the consumer stands just before what it was handed.
            handler.note_applied(first.previous(), false);
            let started = std::time::Instant::now();
            let pending = applicable.last().and_then(|m| m.info().ok().map(|i| i.pending));
            // On shutdown the work in hand is dropped (a transaction rolls back, a mail claim's
            // connection closes) and the messages are handed back at once, so the next process
            // takes them without waiting out the ack wait; handlers are idempotent, so one that
            // had committed is skipped on redelivery.
            let finished = tokio::select! {
                () = handler.apply(&events, pending == Some(0), shutdown) => !shutdown.is_cancelled(),
                () = shutdown.cancelled() => false,
            };
            if !finished {
                // The pull is ended first: a NAK is redelivered at once to whatever pull of this
                // consumer is waiting, and if that were this one, about to go away, the batch
                // would sit out the whole ack wait instead of going to the next process.
                drop(messages);
                for message in &applicable {
                    let _ = message.ack_with(jetstream::AckKind::Nak(None)).await;
                }
                // A NAK is only queued in the client: flushed here, or the process may exit with
                // it unsent.
                if let Some(message) = applicable.first() {
                    let client = message.context.client();
                    if tokio::time::timeout(Duration::from_secs(2), client.flush()).await.is_err() {
                        tracing::warn!(
                            consumer = name,
                            "could not hand the batch back in time; it returns after the ack wait"
                        );
                    }
                }
                return Ok(());
            }
            tracing::debug!(
                consumer = name,
                events = events.len(),
                first = events[0].global_position,
                took_us = started.elapsed().as_micros() as u64,
                "applied"
            );
            for message in &applicable {
                if let Err(e) = message.ack().await {
                    // The batch is committed; a lost ack means redelivery, which the handler skips.
                    tracing::warn!(consumer = name, error = %e, "ack failed");
                }
            }
            if let Some(last) = events.last() {
                handler.note_applied(last.position(), true);
            }
            metrics::counter!("cairn_consumer_events_total", "consumer" => name).increment(events.len() as u64);
        }
        if let Some(e) = broken {
            return Err(e);
        }
    }
}

/// A handler with the consumer loop's side of parking: transient failures are retried as they
/// are, others one event at a time, and an event that fails [`ATTEMPTS`] times for a reason of its
/// own is parked. Operators' decisions addressed to this consumer are carried out here too,
/// unless the handler does both itself.
struct Parking<H> {
    handler: H,
    name: &'static str,
    pool: sqlx::PgPool,
    /// The position of the last event this loop applied (see [`Parking::note_applied`]).
    applied: std::sync::Arc<std::sync::Mutex<Option<crate::envelope::ConsistencyToken>>>,
}

/// How often each consumer's lag gauge (`cairn_consumer_lag_events`) is measured.
pub const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Sets `cairn_consumer_lag_events{consumer = name}` every [`LAG_SAMPLE_EVERY`] until `stop`: the
/// committed events in the log past the consumer's checkpoint (`checkpoint`, or else the
/// position in `applied`), counted up to [`crate::checkpoint::LAG_COUNT_CAP`]. It reads only
/// Postgres, so events the relay has not published yet (NATS away) count too.
async fn sample_lag(
    pool: sqlx::PgPool,
    name: &'static str,
    checkpoint: Option<&'static str>,
    applied: std::sync::Arc<std::sync::Mutex<Option<crate::envelope::ConsistencyToken>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let at = match checkpoint {
            Some(checkpoint) => crate::checkpoint::read(&pool, checkpoint).await.map(Some),
            None => Ok(*applied.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
        };
        let lag = match at {
            Ok(Some(at)) => crate::checkpoint::events_after(&pool, at).await.map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match lag {
            Ok(Some(lag)) => metrics::gauge!("cairn_consumer_lag_events", "consumer" => name).set(lag as f64),
            // Nothing delivered to this worker yet: its position is not known.
            Ok(None) => {}
            Err(e) => tracing::debug!(consumer = name, error = %e, "cannot measure the consumer's lag"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LAG_SAMPLE_EVERY) => {}
        }
    }
}

/// How often one event is tried, for a reason of its own, before it is parked.
const ATTEMPTS: u32 = 3;

impl<H: EventBatchHandler> Parking<H> {
    /// Records that the consumer has applied everything up to `at`: always when `applied`, and
    /// only as a first estimate (nothing recorded yet) otherwise.
    fn note_applied(&self, at: crate::envelope::ConsistencyToken, applied: bool) {
        let mut position = self.applied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if applied || position.is_none() {
            *position = Some(at);
        }
    }

    /// Applies `events` until done or `shutdown`: never handed back (NAK), which would let later
    /// messages overtake them. The handler is idempotent, so a retry after a partial failure is safe.
    async fn apply(
        &self,
        events: &[crate::envelope::EventEnvelope],
        caught_up: bool,
        shutdown: &tokio_util::sync::CancellationToken,
    ) {
        let name = self.name;
        let mut backoff = Backoff::new();
        loop {
            match self.handler.handle_hinted(events, caught_up).await {
                Ok(()) => break,
                Err(e) if is_transient(&e) || self.handler.parks_itself() => {
                    tracing::warn!(consumer = name, error = %format!("{e:#}"), retry_in_ms = backoff.next_ms(), "batch failed; retrying");
                    if !backoff.wait(shutdown).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(consumer = name, error = %crate::http::loggable(e.as_ref()), "batch refused; one event at a time");
                    for event in events {
                        if !self.apply_one(event, shutdown).await {
                            return;
                        }
                    }
                    break;
                }
            }
        }
        if !self.handler.parks_itself() {
            for event in events {
                if let Some(decision) = crate::parking::control(event, name) {
                    self.decide(decision, shutdown).await;
                }
            }
        }
    }

    /// Applies one event, parking it after [`ATTEMPTS`] refusals. False on `shutdown`.
    async fn apply_one(
        &self,
        event: &crate::envelope::EventEnvelope,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> bool {
        let mut backoff = Backoff::new();
        let mut refused = 0;
        loop {
            let outcome: anyhow::Result<()> = match self.handler.handle(std::slice::from_ref(event)).await {
                Ok(()) => return true,
                Err(e) if is_transient(&e) => Err(e),
                Err(e) => {
                    refused += 1;
                    if refused >= ATTEMPTS {
                        match crate::parking::park(&self.pool, self.name, event, &e).await {
                            Ok(()) => return true,
                            Err(park) => Err(anyhow::Error::from(park)),
                        }
                    } else {
                        Err(e)
                    }
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(consumer = self.name, event_id = %event.event_id, error = %format!("{e:#}"), "event failed; retrying");
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
    }

    /// Carries out an operator's decision; a failure to reach Postgres is retried until `shutdown`.
    async fn decide(&self, decision: crate::parking::Control, shutdown: &tokio_util::sync::CancellationToken) {
        use crate::parking::{self, Control};
        let mut backoff = Backoff::new();
        loop {
            let done: anyhow::Result<()> = async {
                match decision {
                    Control::Skip(id) => parking::skipped(&self.pool, self.name, id).await?,
                    Control::Retry(id) => {
                        if !parking::is_parked(&self.pool, self.name, id).await? {
                            return Ok(());
                        }
                        let Some(event) = crate::envelope::load(&self.pool, id).await? else { return Ok(()) };
                        match self.handler.handle(std::slice::from_ref(&event)).await {
                            Ok(()) => parking::resolved(&self.pool, self.name, id).await?,
                            Err(e) if is_transient(&e) => return Err(e),
                            Err(e) => parking::park(&self.pool, self.name, &event, &e).await?,
                        }
                    }
                }
                Ok(())
            }
            .await;
            match done {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(consumer = self.name, error = %format!("{e:#}"), "parked-event decision failed; retrying")
                }
            }
            if !backoff.wait(shutdown).await {
                return;
            }
        }
    }
}

/// Doubling pauses from 100 ms up to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }

    fn next_ms(&self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }

    /// Sleeps the current pause and doubles it. False when `shutdown` came first.
    async fn wait(&mut self, shutdown: &tokio_util::sync::CancellationToken) -> bool {
        let pause = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(pause) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_by_the_namespace() {
        let none = Namespace::new("");
        assert_eq!(none.events_stream(), "EVENTS");
        assert_eq!(none.event_subject("User", "UserRegistered"), "events.User.UserRegistered");
        let ns = Namespace::new("t-42");
        assert_eq!(ns.events_stream(), "T_42_EVENTS");
        assert_eq!(ns.all_events(), "t-42.events.>");
    }
}
