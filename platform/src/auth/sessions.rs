//! The in-memory view of which sessions are over, so tokens are checked with no database query
//! per request:
//!
//! - user → session version. Tokens carry the version they were issued at; a token below the
//!   user's current version is refused (deactivation, sign-out everywhere, password change…).
//! - session id → revoked. A signed-out session's access tokens are refused until they would
//!   have expired anyway.
//! - role → the permissions it grants now. A token keeps only the permissions one of its roles
//!   still grants, so a role whose permissions shrink takes them from tokens already issued at
//!   once (a role that grows reaches its holders' next tokens).
//!
//! Fed from the event stream. Session-ending events carry the new version, so applying them is
//! `max` and order does not matter. At start the follower subscribes first and then loads from
//! the events table (the source of truth), so no event falls between the load and the subscription.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::envelope::EventEnvelope;
use crate::nats::Namespace;

/// The name under which the session map parks the session-ending events it cannot read.
pub const SESSION_MAP: &str = "session_map";

/// The user events that end sessions, with the new version in their payload.
const SESSION_EVENTS: &[&str] = &[
    "RoleRevoked",
    "UserDeactivated",
    "UserDeleted",
    "PasswordChanged",
    "PasswordReset",
    "PasswordRemoved",
    "SessionsEnded",
];

/// The role events that set a role's permissions, with all of them in their payload.
const ROLE_EVENTS: &[&str] = &["RoleDefined", "RolePermissionsChanged"];

#[derive(Debug, Default)]
struct State {
    versions: HashMap<Uuid, u64>,
    /// Revoked session → when its last access token expires at the latest.
    revoked: HashMap<Uuid, DateTime<Utc>>,
    /// Role → (sequence of the event that set them, its permissions now).
    roles: HashMap<String, (i64, Vec<String>)>,
}

/// Which sessions are over. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SessionVersions {
    inner: Arc<RwLock<State>>,
    /// Access-token lifetime: how long a revoked session must be remembered.
    token_ttl: chrono::Duration,
}

impl Default for SessionVersions {
    fn default() -> Self {
        Self::new(Duration::from_secs(900))
    }
}

impl SessionVersions {
    /// An empty map remembering revoked sessions for `token_ttl`.
    #[must_use]
    pub fn new(token_ttl: Duration) -> Self {
        Self {
            inner: Arc::default(),
            token_ttl: chrono::Duration::from_std(token_ttl).unwrap_or_else(|_| chrono::Duration::minutes(15)),
        }
    }

    /// Records that `user`'s sessions below `version` are over.
    pub fn observe(&self, user: Uuid, version: u64) {
        if let Ok(mut state) = self.inner.write() {
            let entry = state.versions.entry(user).or_insert(0);
            *entry = (*entry).max(version);
        }
    }

    /// Records that session `sid` ended at `at`.
    pub fn revoke_session(&self, sid: Uuid, at: DateTime<Utc>) {
        let until = at + self.token_ttl + chrono::Duration::seconds(30);
        if until <= Utc::now() {
            return;
        }
        if let Ok(mut state) = self.inner.write() {
            let now = Utc::now();
            state.revoked.retain(|_, expires| *expires > now);
            state.revoked.insert(sid, until);
        }
    }

    /// Whether a token of session `sid` issued at session version `sv` is still current for `user`.
    #[must_use]
    pub fn is_current(&self, user: Uuid, sv: u64, sid: Uuid) -> bool {
        self.inner.read().is_ok_and(|state| {
            state.versions.get(&user).is_none_or(|current| sv >= *current) && !state.revoked.contains_key(&sid)
        })
    }

    /// Records that `role`'s permissions are `permissions` as of its event number `sequence`
    /// (older news is ignored, so events may arrive in any order).
    pub fn observe_role(&self, role: &str, sequence: i64, permissions: Vec<String>) {
        if let Ok(mut state) = self.inner.write() {
            match state.roles.get(role) {
                Some((known, _)) if *known >= sequence => {}
                _ => {
                    state.roles.insert(role.to_owned(), (sequence, permissions));
                }
            }
        }
    }

    /// Of `perms` (what a token says its `roles` granted when it was issued), those one of the
    /// roles still grants. A role this process has not heard of yet keeps what the token says.
    #[must_use]
    pub fn still_granted(&self, roles: &[String], perms: Vec<String>) -> Vec<String> {
        let Ok(state) = self.inner.read() else { return perms };
        perms
            .into_iter()
            .filter(|perm| {
                roles.iter().any(|role| state.roles.get(role).is_none_or(|(_, granted)| granted.contains(perm)))
            })
            .collect()
    }

    /// Applies one event from the stream, if it ends sessions or changes a role.
    pub fn apply(&self, event: &EventEnvelope) {
        if let Err(e) = self.try_apply(event) {
            tracing::error!(event_id = %event.event_id, error = %format!("{e:#}"), "session-ending event unreadable");
        }
    }

    /// Applies one event, if it ends sessions.
    ///
    /// # Errors
    /// When it is a session-ending event whose user or version cannot be read.
    pub fn try_apply(&self, event: &EventEnvelope) -> anyhow::Result<()> {
        match (event.aggregate_type.as_str(), event.event_type.as_str()) {
            ("User", kind) if SESSION_EVENTS.contains(&kind) => {
                let user: Uuid = event.aggregate_id.parse()?;
                let version = event
                    .body()
                    .get("session_version")
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| anyhow::anyhow!("{kind} has no readable session_version"))?;
                self.observe(user, version);
            }
            ("Session", "SessionRevoked") => {
                let sid: Uuid = event.aggregate_id.parse()?;
                self.revoke_session(sid, event.recorded_at);
            }
            ("Role", kind) if ROLE_EVENTS.contains(&kind) => {
                let permissions: Vec<String> = event
                    .body()
                    .get("permissions")
                    .cloned()
                    .map(serde_json::from_value)
                    .transpose()?
                    .ok_or_else(|| anyhow::anyhow!("{kind} has no readable permissions"))?;
                self.observe_role(&event.aggregate_id, event.sequence, permissions);
            }
            _ => {}
        }
        Ok(())
    }

    /// Applies a streamed event; one that ends sessions but cannot be read is parked (every API
    /// process parks the same row), and operators' decisions about those are carried out.
    async fn apply_streamed(&self, pool: &PgPool, event: &EventEnvelope) {
        let outcome: anyhow::Result<()> = async {
            match crate::parking::control(event, SESSION_MAP) {
                Some(crate::parking::Control::Skip(id)) => crate::parking::skipped(pool, SESSION_MAP, id).await?,
                Some(crate::parking::Control::Retry(id)) => {
                    if crate::parking::is_parked(pool, SESSION_MAP, id).await? {
                        if let Some(parked) = crate::envelope::load(pool, id).await? {
                            match self.try_apply(&parked) {
                                Ok(()) => crate::parking::resolved(pool, SESSION_MAP, id).await?,
                                Err(e) => crate::parking::park(pool, SESSION_MAP, &parked, &e).await?,
                            }
                        }
                    }
                }
                None => {
                    if let Err(e) = self.try_apply(event) {
                        crate::parking::park(pool, SESSION_MAP, event, &e).await?;
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            tracing::warn!(event_id = %event.event_id, error = %format!("{e:#}"), "session map could not record a parked event");
        }
    }

    /// Loads versions, recent revocations and role permissions from the events table.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn load(&self, pool: &PgPool) -> sqlx::Result<()> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            // An unreadable version is left out (the stream parks it), never allowed to fail the load.
            "SELECT aggregate_id, max(CASE WHEN payload -> event_type ->> 'session_version' ~ '^[0-9]{1,18}$' \
                                          THEN (payload -> event_type ->> 'session_version')::bigint END) \
             FROM events WHERE aggregate_type = 'User' AND event_type = ANY($1) GROUP BY aggregate_id \
             HAVING bool_or(payload -> event_type ->> 'session_version' ~ '^[0-9]{1,18}$')",
        )
        .bind(SESSION_EVENTS)
        .fetch_all(pool)
        .await?;
        for (id, version) in rows {
            if let Ok(user) = id.parse() {
                self.observe(user, u64::try_from(version).unwrap_or(0));
            }
        }
        let since = Utc::now() - self.token_ttl - chrono::Duration::seconds(30);
        let revoked: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT aggregate_id, recorded_at FROM events \
             WHERE aggregate_type = 'Session' AND event_type = 'SessionRevoked' AND recorded_at > $1",
        )
        .bind(since)
        .fetch_all(pool)
        .await?;
        for (id, at) in revoked {
            if let Ok(sid) = id.parse() {
                self.revoke_session(sid, at);
            }
        }
        // Each role's newest definition; one whose permissions cannot be read is left out (the
        // stream parks it), and its holders' tokens keep what they say until it is fixed.
        let roles: Vec<(String, i64, serde_json::Value)> = sqlx::query_as(
            "SELECT DISTINCT ON (aggregate_id) aggregate_id, sequence, payload -> event_type -> 'permissions' \
             FROM events WHERE aggregate_type = 'Role' AND event_type = ANY($1) \
             ORDER BY aggregate_id, sequence DESC",
        )
        .bind(ROLE_EVENTS)
        .fetch_all(pool)
        .await?;
        for (role, sequence, permissions) in roles {
            if let Ok(permissions) = serde_json::from_value(permissions) {
                self.observe_role(&role, sequence, permissions);
            }
        }
        Ok(())
    }

    /// Follows the stream until `shutdown`, reconnecting as needed. Returns once the first
    /// subscriptions and the initial load are done, so the map is complete before requests arrive.
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
        let filters = [
            ns.event_subject("User", "*"),
            ns.event_subject("Session", "SessionRevoked"),
            ns.event_subject("Role", "*"),
            ns.event_subject(crate::parking::AGGREGATE, "*"),
        ];
        let first = subscribe_all(&js, &ns, &filters).await;
        if first.is_err() {
            tracing::warn!("session follower cannot reach JetStream yet; will retry");
        }
        self.load(&pool).await?;
        let map = self.clone();
        tokio::spawn(async move {
            let mut streams = first.ok();
            loop {
                if let Some(subscriptions) = streams.take() {
                    let merged = futures::stream::select_all(subscriptions);
                    map.drain(&pool, merged, &shutdown).await;
                }
                if shutdown.is_cancelled() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                // A new subscription may have missed events while down: reload from the log.
                if let Ok(subscriptions) = subscribe_all(&js, &ns, &filters).await {
                    if map.load(&pool).await.is_ok() {
                        streams = Some(subscriptions);
                    }
                }
            }
        });
        Ok(())
    }

    async fn drain(
        &self,
        pool: &PgPool,
        mut stream: futures::stream::SelectAll<consumer::pull::Ordered>,
        shutdown: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = stream.next() => match next {
                    Some(Ok(message)) => {
                        match serde_json::from_slice::<EventEnvelope>(&message.payload) {
                            Ok(event) => self.apply_streamed(pool, &event).await,
                            Err(e) => tracing::error!(subject = %message.subject, error = %e, "not an event envelope; ignored"),
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "session stream interrupted");
                        return;
                    }
                    None => return,
                }
            }
        }
    }
}

async fn subscribe_all(
    js: &jetstream::Context,
    ns: &Namespace,
    filters: &[String],
) -> anyhow::Result<Vec<consumer::pull::Ordered>> {
    let stream = js.get_stream(ns.events_stream()).await?;
    let mut out = Vec::new();
    for filter in filters {
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await?;
        out.push(consumer.messages().await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_merge_by_max_and_revocations_are_per_session() {
        let map = SessionVersions::default();
        let (user, sid, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert!(map.is_current(user, 0, sid));
        map.observe(user, 2);
        map.observe(user, 1);
        assert!(!map.is_current(user, 1, sid));
        assert!(map.is_current(user, 2, sid));
        map.revoke_session(sid, Utc::now());
        assert!(!map.is_current(user, 2, sid));
        assert!(map.is_current(user, 2, other));
    }

    #[test]
    fn a_token_keeps_only_the_permissions_its_roles_still_grant() {
        let map = SessionVersions::default();
        let roles = vec!["moderator".to_owned(), "helper".to_owned()];
        let perms = || vec!["users:read".to_owned(), "audit:read".to_owned(), "files:read".to_owned()];
        assert_eq!(map.still_granted(&roles, perms()), perms(), "roles not heard of keep what the token says");
        map.observe_role("moderator", 2, vec!["audit:read".into()]);
        map.observe_role("moderator", 1, vec!["users:read".into(), "audit:read".into()]);
        map.observe_role("helper", 1, vec!["files:read".into()]);
        assert_eq!(map.still_granted(&roles, perms()), ["audit:read", "files:read"], "older news is ignored");
        assert_eq!(map.still_granted(&["helper".to_owned()], perms()), ["files:read"]);
    }
}
