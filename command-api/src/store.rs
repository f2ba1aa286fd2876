//! The event store every command goes through: postgres-es, with a bounded in-memory cache of
//! aggregates as of a sequence.
//!
//! Loading an aggregate reads only the events after the cached sequence (all of them when it is
//! not cached), so a command costs the same on a stream of ten events or ten thousand. The cache
//! never decides anything on its own: the tail is always read from the events table, so a change
//! made by another process is seen, and an append that lost a race (the sequence is taken) fails
//! in Postgres as before and evicts the entry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventRepository, PersistedEventStore, SerializedEvent};
use cqrs_es::{Aggregate, AggregateError, EventEnvelope, EventStore};
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;

/// How many aggregates of one type are kept; the least recently used go first.
pub const CACHED_AGGREGATES: usize = 10_000;

/// postgres-es with an aggregate cache.
pub struct CachedStore<A: Aggregate> {
    pool: PgPool,
    repo: PostgresEventRepository,
    inner: PersistedEventStore<PostgresEventRepository, A>,
    cache: Arc<Mutex<Cache<A>>>,
}

impl<A: Aggregate + Clone> CachedStore<A> {
    /// A store over `pool` keeping up to `capacity` aggregates.
    #[must_use]
    pub fn new(pool: PgPool, capacity: usize) -> Self {
        Self::with_cache(pool, Arc::new(Mutex::new(Cache::new(capacity))))
    }

    fn with_cache(pool: PgPool, cache: Arc<Mutex<Cache<A>>>) -> Self {
        Self {
            inner: PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone()))
                .with_upcasters(cairn_domain::upcast::event_store_upcasters()),
            repo: PostgresEventRepository::new(pool.clone()),
            pool,
            cache,
        }
    }

    /// Another handle on the same cache (one goes to the framework, one serves plain loads).
    #[must_use]
    pub fn share(&self) -> Self {
        Self::with_cache(self.pool.clone(), Arc::clone(&self.cache))
    }

    fn cached(&self, id: &str) -> Option<(A, usize)> {
        self.cache.lock().ok()?.get(id)
    }

    fn remember(&self, id: &str, aggregate: A, sequence: usize) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(id, aggregate, sequence);
        }
    }

    fn forget(&self, id: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(id);
        }
    }
}

impl<A: Aggregate + Clone> EventStore<A> for CachedStore<A> {
    type AC = EventStoreAggregateContext<A>;

    async fn load_events(&self, aggregate_id: &str) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        self.inner.load_events(aggregate_id).await
    }

    async fn load_aggregate(&self, aggregate_id: &str) -> Result<Self::AC, AggregateError<A::Error>> {
        let (mut aggregate, mut sequence) = self.cached(aggregate_id).unwrap_or_default();
        let tail = self.repo.get_last_events::<A>(aggregate_id, sequence).await?;
        let had_tail = !tail.is_empty();
        for serialized in tail {
            // Events stored under an older version are read as the current shape.
            let serialized = upcast(serialized);
            let envelope = EventEnvelope::<A>::try_from(serialized)?;
            sequence = envelope.sequence;
            aggregate.apply(envelope.payload);
        }
        if had_tail {
            self.remember(aggregate_id, aggregate.clone(), sequence);
        }
        Ok(EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_owned(),
            aggregate,
            current_sequence: sequence,
            current_snapshot: None,
        })
    }

    async fn commit(
        &self,
        events: Vec<A::Event>,
        context: Self::AC,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let id = context.aggregate_id.clone();
        // The framework's event sink has already applied `events` to the context's aggregate.
        let after = context.aggregate.clone();
        let sequence = context.current_sequence + events.len();
        match self.inner.commit(events, context, metadata).await {
            Ok(committed) => {
                self.remember(&id, after, sequence);
                Ok(committed)
            }
            Err(e) => {
                self.forget(&id);
                Err(e)
            }
        }
    }
}

fn upcast(mut event: SerializedEvent) -> SerializedEvent {
    if cairn_domain::upcast::needs_upcast(&event.event_type, &event.event_version) {
        let (payload, version) = cairn_domain::upcast::upcast(&event.event_type, &event.event_version, event.payload);
        event.payload = payload;
        event.event_version = version;
    }
    event
}

/// A bounded map with least-recently-used eviction.
struct Cache<A> {
    entries: HashMap<String, (A, usize, u64)>,
    capacity: usize,
    clock: u64,
}

impl<A: Clone> Cache<A> {
    fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), capacity: capacity.max(1), clock: 0 }
    }

    fn get(&mut self, id: &str) -> Option<(A, usize)> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(id).map(|(aggregate, sequence, used)| {
            *used = clock;
            (aggregate.clone(), *sequence)
        })
    }

    fn put(&mut self, id: &str, aggregate: A, sequence: usize) {
        self.clock += 1;
        if let Some(entry) = self.entries.get_mut(id) {
            // Never step back: a slower load may finish after a newer commit.
            if entry.1 <= sequence {
                *entry = (aggregate, sequence, self.clock);
            }
            return;
        }
        if self.entries.len() >= self.capacity {
            // Evict the least recently used eighth at once, so eviction is rare.
            let mut ages: Vec<u64> = self.entries.values().map(|e| e.2).collect();
            let cut = ages.len() / 8;
            ages.select_nth_unstable(cut);
            let threshold = ages[cut];
            self.entries.retain(|_, e| e.2 > threshold);
        }
        self.entries.insert(id.to_owned(), (aggregate, sequence, self.clock));
    }

    fn remove(&mut self, id: &str) {
        self.entries.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_are_evicted_first() {
        let mut cache = Cache::new(8);
        for i in 0..8 {
            cache.put(&i.to_string(), i, 1);
        }
        assert!(cache.get("0").is_some()); // 0 is now the most recent
        cache.put("new", 99, 1);
        assert!(cache.get("0").is_some());
        assert!(cache.get("1").is_none(), "the oldest entry was evicted");
        assert_eq!(cache.get("new"), Some((99, 1)));
        assert!(cache.entries.len() <= 8);
    }

    #[test]
    fn an_entry_never_goes_back_to_an_older_sequence() {
        let mut cache = Cache::new(4);
        cache.put("a", 5, 5);
        cache.put("a", 3, 3);
        assert_eq!(cache.get("a"), Some((5, 5)));
        cache.put("a", 6, 6);
        assert_eq!(cache.get("a"), Some((6, 6)));
    }
}
