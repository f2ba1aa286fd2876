//! The in-memory map user → session version. Tokens carry the version they were issued at; a
//! token below the user's current version is refused with no database query per request.
//!
//! The map is fed from the event stream. Session-ending events carry the new version, so
//! applying them is `max` and order does not matter. At start the follower subscribes first and
//! then loads the versions from the events table (the source of truth), so no event falls
//! between the load and the subscription.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::envelope::EventEnvelope;
use crate::nats::Namespace;

/// The events that end sessions, with the new version in their payload.
const SESSION_EVENTS: &[&str] = &["RoleRevoked", "UserDeactivated", "UserDeleted"];

/// User → minimum valid session version. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct SessionVersions {
    inner: Arc<RwLock<HashMap<Uuid, u64>>>,
}

impl SessionVersions {
    /// Records that `user`'s sessions below `version` are over.
    pub fn observe(&self, user: Uuid, version: u64) {
        if let Ok(mut map) = self.inner.write() {
            let entry = map.entry(user).or_insert(0);
            *entry = (*entry).max(version);
        }
    }

    /// Whether a token with session version `sv` is still current for `user`.
    #[must_use]
    pub fn is_current(&self, user: Uuid, sv: u64) -> bool {
        self.inner.read().is_ok_and(|map| map.get(&user).is_none_or(|current| sv >= *current))
    }

    /// Applies one event from the stream, if it ends sessions.
    pub fn apply(&self, event: &EventEnvelope) {
        if event.aggregate_type != "User" || !SESSION_EVENTS.contains(&event.event_type.as_str()) {
            return;
        }
        let version = event.body().get("session_version").and_then(serde_json::Value::as_u64);
        if let (Ok(user), Some(version)) = (event.aggregate_id.parse::<Uuid>(), version) {
            self.observe(user, version);
        }
    }

    /// Loads every user's version from the events table.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn load(&self, pool: &PgPool) -> sqlx::Result<()> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT aggregate_id, max((payload -> event_type ->> 'session_version')::bigint) \
             FROM events WHERE aggregate_type = 'User' AND event_type = ANY($1) GROUP BY aggregate_id",
        )
        .bind(SESSION_EVENTS)
        .fetch_all(pool)
        .await?;
        for (id, version) in rows {
            if let Ok(user) = id.parse() {
                self.observe(user, u64::try_from(version).unwrap_or(0));
            }
        }
        Ok(())
    }

    /// Follows the stream until `shutdown`, reconnecting as needed. Returns once the first
    /// subscription and the initial load are done, so the map is complete before requests arrive.
    ///
    /// # Errors
    /// When the initial load from Postgres fails.
    pub async fn follow(
        &self,
        pool: PgPool,
        js: jetstream::Context,
        ns: Namespace,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let first = subscribe(&js, &ns).await;
        if first.is_err() {
            tracing::warn!("session-version follower cannot reach JetStream yet; will retry");
        }
        self.load(&pool).await?;
        let map = self.clone();
        tokio::spawn(async move {
            let mut messages = first.ok();
            loop {
                if let Some(stream) = messages.take() {
                    map.drain(stream, &shutdown).await;
                }
                if shutdown.is_cancelled() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                // A new subscription may have missed events while down: reload from the log.
                if let Ok(stream) = subscribe(&js, &ns).await {
                    if map.load(&pool).await.is_ok() {
                        messages = Some(stream);
                    }
                }
            }
        });
        Ok(())
    }

    async fn drain(&self, mut stream: consumer::pull::Ordered, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = stream.next() => match next {
                    Some(Ok(message)) => {
                        if let Ok(event) = serde_json::from_slice::<EventEnvelope>(&message.payload) {
                            self.apply(&event);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "session-version stream interrupted");
                        return;
                    }
                    None => return,
                }
            }
        }
    }
}

async fn subscribe(js: &jetstream::Context, ns: &Namespace) -> anyhow::Result<consumer::pull::Ordered> {
    let stream = js.get_stream(ns.events_stream()).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: ns.event_subject("User", "*"),
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}
