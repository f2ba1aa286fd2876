//! Celery-style jobs: the handlers, the runner that claims and runs them with leases, and the
//! scheduler that fires cron schedules.
//!
//! A kind is registered in code: implement [`JobHandler`] and add it to the [`Registry`] the
//! workers are built with. The handler is given the job's id so that its effects can be made
//! idempotent: delivery is at least once (a worker that dies mid-job has its job run again
//! once the lease runs out).

pub mod backoff;
pub mod kinds;
pub mod runner;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_platform::clock::SharedClock;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use kinds::{shipped, KindDeps};
pub use runner::JobRunner;

/// What a handler is given about the job it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job's id: the key for idempotent effects (Standard Webhooks' `webhook-id`, say).
    pub id: Uuid,
    /// Its kind.
    pub kind: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// This attempt, from 1.
    pub attempt: i32,
    /// Attempts allowed in all.
    pub max_attempts: i32,
    /// When it was enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// Cancelled when the attempt must stop: its lease was lost, its timeout passed, or the
    /// process is stopping past its grace period. A handler doing long work checks it.
    pub cancel: CancellationToken,
    /// The process's clock.
    pub clock: SharedClock,
    /// The database (never hold a transaction open across network I/O).
    pub pool: PgPool,
}

/// Why an attempt failed, and what to do about it.
#[derive(Debug)]
pub enum JobError {
    /// Try again after the usual backoff (exponential, full jitter), until `max_attempts`.
    Retry(anyhow::Error),
    /// Try again after this long (a `Retry-After`), still counting the attempt.
    RetryAfter(Duration, anyhow::Error),
    /// Do not try again: the job is `failed` at once.
    Permanent(anyhow::Error),
}

impl JobError {
    /// The error's text, as recorded with the attempt.
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            Self::Retry(e) | Self::RetryAfter(_, e) | Self::Permanent(e) => format!("{e:#}"),
        }
    }
}

impl From<anyhow::Error> for JobError {
    fn from(e: anyhow::Error) -> Self {
        Self::Retry(e)
    }
}

/// One kind of job.
pub trait JobHandler: Send + Sync + 'static {
    /// The kind it runs (`webhook.deliver`).
    fn kind(&self) -> &'static str;

    /// Runs one attempt. Returning `Ok` marks the job done.
    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>>;
}

/// The kinds a worker process can run.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<&'static str, Arc<dyn JobHandler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `handler` (replacing one of the same kind).
    #[must_use]
    pub fn with(mut self, handler: impl JobHandler) -> Self {
        self.handlers.insert(handler.kind(), Arc::new(handler));
        self
    }

    /// Adds every handler of `other` (replacing those of the same kinds).
    #[must_use]
    pub fn merge(mut self, other: Registry) -> Self {
        self.handlers.extend(other.handlers);
        self
    }

    /// The handler for `kind`.
    #[must_use]
    pub fn get(&self, kind: &str) -> Option<Arc<dyn JobHandler>> {
        self.handlers.get(kind).cloned()
    }

    /// The registered kinds.
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.handlers.keys().copied()
    }
}
