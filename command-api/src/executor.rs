//! Runs commands on any aggregate through postgres-es, with the request's metadata, and answers
//! with the consistency token of the newest event. Every command path goes through here.

use std::sync::Arc;

use cairn_platform::auth::SessionVersions;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, RequestContext};
use cairn_relay::RelayWakeup;
use cqrs_es::{Aggregate, AggregateError, CqrsFramework, EventStore};

use crate::store::{CachedStore, CACHED_AGGREGATES};
use sqlx::PgPool;
use uuid::Uuid;

type Store<A> = CachedStore<A>;

/// How an aggregate's refusals reach the client: 4xx, never 5xx.
pub trait Refusal: std::error::Error {
    /// The API error for this refusal.
    fn to_api(&self) -> ApiError;
}

/// Executes commands on aggregates of type `A`.
pub struct Executor<A: Aggregate<Services = ()> + Clone> {
    cqrs: Arc<CqrsFramework<A, Store<A>>>,
    store: Arc<Store<A>>,
    pool: PgPool,
    sessions: SessionVersions,
    wake: RelayWakeup,
}

impl<A: Aggregate<Services = ()> + Clone> Clone for Executor<A> {
    fn clone(&self) -> Self {
        Self {
            cqrs: Arc::clone(&self.cqrs),
            store: Arc::clone(&self.store),
            pool: self.pool.clone(),
            sessions: self.sessions.clone(),
            wake: self.wake.clone(),
        }
    }
}

impl<A> Executor<A>
where
    A: Aggregate<Services = ()> + Clone + 'static,
    A::Error: Refusal,
{
    /// An executor over `pool`. Session-ending events it appends update `sessions` at once, so
    /// this process refuses old tokens immediately; other processes learn it from the stream.
    /// Each committed command signals `wake`.
    #[must_use]
    pub fn new(pool: PgPool, sessions: SessionVersions, wake: RelayWakeup) -> Self {
        Self::with_cache(pool, sessions, wake, CACHED_AGGREGATES)
    }

    /// As [`Self::new`], keeping up to `cached` aggregates in memory (fewer for large, rarely
    /// changed aggregates such as messages).
    #[must_use]
    pub fn with_cache(pool: PgPool, sessions: SessionVersions, wake: RelayWakeup, cached: usize) -> Self {
        let store = CachedStore::new(pool.clone(), cached);
        let cqrs = Arc::new(CqrsFramework::new(store.share(), vec![], ()));
        Self { cqrs, store: Arc::new(store), pool, sessions, wake }
    }

    /// The database.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `command` on aggregate `id` as `actor`.
    ///
    /// # Errors
    /// The aggregate's refusal as a 4xx, CONFLICT on a concurrent change, 503 when Postgres is down.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
        ctx: &RequestContext,
        actor: Option<Uuid>,
    ) -> Result<ConsistencyToken, ApiError> {
        let actor = actor.map(|a| a.to_string());
        self.cqrs
            .execute_with_metadata(id, command, ctx.command_metadata(actor.as_deref()))
            .await
            .map_err(map_error)?;
        self.committed(id, ctx).await
    }

    /// As [`Self::execute`], but a lost race (another command appended to the aggregate first)
    /// is decided again on the new state, up to `attempts` times in all: for commands that
    /// record what already happened elsewhere, which must not fail because they came second.
    ///
    /// # Errors
    /// As [`Self::execute`]; CONFLICT only after `attempts` lost races.
    pub async fn execute_retrying(
        &self,
        id: &str,
        command: A::Command,
        ctx: &RequestContext,
        actor: Option<Uuid>,
        attempts: u32,
    ) -> Result<ConsistencyToken, ApiError>
    where
        A::Command: Clone,
    {
        let actor = actor.map(|a| a.to_string());
        let mut attempt = 1;
        loop {
            let metadata = ctx.command_metadata(actor.as_deref());
            match self.cqrs.execute_with_metadata(id, command.clone(), metadata).await {
                Ok(()) => return self.committed(id, ctx).await,
                Err(AggregateError::AggregateConflict) if attempt < attempts => attempt += 1,
                Err(e) => return Err(map_error(e)),
            }
        }
    }

    /// After a command on `id` committed: wakes the relay, counts, feeds the session map, and
    /// answers with the consistency token of the newest event.
    async fn committed(&self, id: &str, ctx: &RequestContext) -> Result<ConsistencyToken, ApiError> {
        self.wake.appended();
        metrics::counter!("cairn_commands_total", "aggregate" => A::TYPE).increment(1);
        let recent = cairn_relay::reader::last_events_of(&self.pool, A::TYPE, id, 3).await?;
        let Some(newest) = recent.first() else { return Ok(ConsistencyToken::default()) };
        // The events this command appended: the newest transaction's, when it carries our request id
        // (a command may also append nothing, leaving an older event newest).
        if newest.meta("request_id") == Some(ctx.request_id.as_str()) {
            let appended = recent.iter().filter(|e| e.transaction_id == newest.transaction_id).count();
            metrics::counter!("cairn_events_appended_total", "aggregate" => A::TYPE).increment(appended as u64);
        }
        for event in recent.iter().rev() {
            self.sessions.apply(event);
        }
        Ok(newest.position())
    }

    /// Loads aggregate `id` from its events (always current, unlike a read model).
    ///
    /// # Errors
    /// 503 when Postgres is down.
    pub async fn load(&self, id: &str) -> Result<A, ApiError> {
        Ok(self.store.load_aggregate(id).await.map_err(map_error)?.aggregate)
    }
}

/// Domain refusals are 4xx; infrastructure failures are 5xx.
fn map_error<E: Refusal>(e: AggregateError<E>) -> ApiError {
    match e {
        AggregateError::UserError(e) => e.to_api(),
        AggregateError::AggregateConflict => ApiError::Conflict("modified concurrently; retry".to_owned()),
        AggregateError::DatabaseConnectionError(e) => ApiError::ServiceUnavailable(e.to_string()),
        AggregateError::DeserializationError(e) | AggregateError::UnexpectedError(e) => {
            // postgres-es reports a pool timeout as an unexpected error.
            if e.to_string().contains("pool timed out") {
                ApiError::ServiceUnavailable(e.to_string())
            } else {
                ApiError::Internal(anyhow::anyhow!("{}", cairn_platform::http::loggable(e.as_ref())))
            }
        }
    }
}

impl Refusal for cairn_domain::UserError {
    fn to_api(&self) -> ApiError {
        use cairn_domain::UserError as E;
        match self {
            E::NotFound | E::Deleted => ApiError::NotFound(self.to_string()),
            _ => ApiError::Conflict(self.to_string()),
        }
    }
}

impl Refusal for cairn_domain::SessionError {
    fn to_api(&self) -> ApiError {
        use cairn_domain::SessionError as E;
        match self {
            E::AlreadyStarted => ApiError::Conflict(self.to_string()),
            _ => ApiError::Unauthenticated(self.to_string()),
        }
    }
}

impl Refusal for cairn_domain::RoleError {
    fn to_api(&self) -> ApiError {
        use cairn_domain::RoleError as E;
        match self {
            E::NotDefined => ApiError::NotFound(self.to_string()),
            E::UnknownPermission(_) => ApiError::field("permissions", self.to_string()),
            E::AlreadyDefined | E::Unchanged => ApiError::Conflict(self.to_string()),
        }
    }
}
