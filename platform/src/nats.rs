//! JetStream wiring: namespaced names, the EVENTS stream and durable consumers.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};

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
    /// Any failure: the batch is redelivered after a pause.
    fn handle(
        &self,
        events: &[crate::envelope::EventEnvelope],
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// Pulls batches from `consumer` and hands them to `handler`; acknowledges only after the
/// handler succeeded (at-least-once delivery; handlers make the effect exactly-once). Runs until
/// `shutdown`, riding out NATS outages.
///
/// Messages arrive through one continuous pull (the server pushes each as soon as it is stored,
/// up to `batch` ahead of the acknowledgements); a batch is whatever has arrived when the previous
/// one is done, up to `batch`, so a quiet stream is applied one event at a time at once and a
/// busy one in full batches.
pub async fn consume<H: EventBatchHandler>(
    consumer: consumer::Consumer<consumer::pull::Config>,
    batch: usize,
    handler: H,
    name: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
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
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Applies batches from one pull until `shutdown` (`Ok`) or until the pull breaks (`Err`).
async fn consume_stream<H: EventBatchHandler>(
    mut messages: consumer::pull::Stream,
    batch: usize,
    handler: &H,
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
        if !events.is_empty() {
            let started = std::time::Instant::now();
            apply_until_done(handler, &events, name, shutdown).await;
            tracing::debug!(
                consumer = name,
                events = events.len(),
                first = events[0].global_position,
                took_us = started.elapsed().as_micros() as u64,
                "applied"
            );
            if shutdown.is_cancelled() {
                return Ok(()); // not acknowledged: delivered again, and skipped if it was applied
            }
            let pending = applicable.last().and_then(|m| m.info().ok().map(|i| i.pending));
            for message in &applicable {
                if let Err(e) = message.ack().await {
                    // The batch is committed; a lost ack means redelivery, which the handler skips.
                    tracing::warn!(consumer = name, error = %e, "ack failed");
                }
            }
            metrics::counter!("cairn_consumer_events_total", "consumer" => name).increment(events.len() as u64);
            if let Some(pending) = pending {
                metrics::gauge!("cairn_consumer_lag_events", "consumer" => name).set(pending as f64);
            }
        }
        if let Some(e) = broken {
            return Err(e);
        }
    }
}

/// Retries the same batch until it applies or `shutdown`: handing it back (NAK) would let later
/// messages overtake it. The handler is idempotent, so a retry after a partial failure is safe.
async fn apply_until_done<H: EventBatchHandler>(
    handler: &H,
    events: &[crate::envelope::EventEnvelope],
    name: &'static str,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match handler.handle(events).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(consumer = name, error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "batch failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
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
