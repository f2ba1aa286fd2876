//! The process's one ordered JetStream consumer: every event of the log, in the log's order,
//! handed to the hub. Ordered consumers are ephemeral and need no acknowledgement; the client
//! recreates one by itself when it notices a gap. When the stream itself fails (NATS down, the
//! consumer deleted), this loop recreates the consumer from the stream sequence after the last
//! event it handed over, so nothing is skipped when the stream still holds it; what a socket
//! still missed (a NATS outage longer than the stream keeps) it gets back with `join.after`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use cairn_platform::envelope::EventEnvelope;
use cairn_platform::nats::Namespace;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::hub::Hub;

/// Opens the consumer (delivering new events only): once this returns, every event stored from
/// now on reaches the hub (when JetStream is reachable; otherwise it keeps trying in the
/// background). Then feeds the hub in the background until `shutdown`.
pub async fn start(
    hub: Arc<Hub>,
    js: jetstream::Context,
    ns: Namespace,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let first = match open(&js, &ns, consumer::DeliverPolicy::New).await {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "realtime consumer cannot start yet; retrying");
            None
        }
    };
    tokio::spawn(run(hub, js, ns, first, shutdown))
}

async fn open(
    js: &jetstream::Context,
    ns: &Namespace,
    deliver_policy: consumer::DeliverPolicy,
) -> anyhow::Result<consumer::pull::Ordered> {
    let stream = js.get_stream(ns.events_stream()).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: ns.all_events(),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}

async fn run(
    hub: Arc<Hub>,
    js: jetstream::Context,
    ns: Namespace,
    first: Option<consumer::pull::Ordered>,
    shutdown: CancellationToken,
) {
    let mut messages = first;
    let mut last_sequence: Option<u64> = None;
    loop {
        if let Some(mut stream) = messages.take() {
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        if let Ok(info) = message.info() {
                            last_sequence = Some(info.stream_sequence);
                        }
                        match serde_json::from_slice::<EventEnvelope>(&message.payload) {
                            Ok(event) => hub.dispatch(&event),
                            Err(e) => {
                                tracing::error!(subject = %message.subject, error = %e, "not an event envelope; ignored")
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "realtime consumer interrupted; recreating it");
                        break;
                    }
                    None => break,
                }
            }
            metrics::counter!("cairn_ws_consumer_restarts_total").increment(1);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let policy = match last_sequence {
            Some(seq) => consumer::DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
            None => consumer::DeliverPolicy::New,
        };
        match open(&js, &ns, policy).await {
            Ok(stream) => messages = Some(stream),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "realtime consumer cannot be recreated yet"),
        }
    }
}
