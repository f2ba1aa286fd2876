//! The `Job` aggregate: what was asked of the background workers and how it ended.
//!
//! A job's running state (attempts, leases, backoff) is bookkeeping kept in the `jobs` table,
//! never in the log. The log keeps the facts worth keeping: who asked for what over the API
//! (`JobEnqueued`), what operators did (`JobRetried`, `JobCancelled`) and how each run of the
//! job ended (`JobFinished`, which the analytics projection counts). Jobs enqueued from code or
//! fired by a schedule have no `JobEnqueued`; their first event is the `JobFinished`.
//!
//! Whether a retry or a cancel is allowed depends on the job's status in the `jobs` table, which
//! is decided by the database in the statement that changes it; the aggregate validates what a
//! request may contain ([`JobRequest`]) and names the events.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The most attempts a job may be given.
pub const MAX_ATTEMPTS_LIMIT: i32 = 1000;
/// Attempts when none are asked for.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 25;
/// The priority range, highest first.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i16> = -100..=100;
/// The longest idempotency key, in characters.
pub const IDEMPOTENCY_KEY_MAX: usize = 200;
/// The largest `args`, serialised, in bytes.
pub const ARGS_MAX_BYTES: usize = 64 * 1024;

/// How a run of a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobOutcome {
    /// The handler succeeded.
    Done,
    /// The handler gave up for good (a permanent error): no attempt is left to try.
    Failed,
    /// Every attempt failed.
    Dead,
}

impl JobOutcome {
    /// `done`, `failed` or `dead`, as the `jobs.status` column has it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Dead => "dead",
        }
    }
}

/// A request for a job, checked: what `POST /api/v1/jobs` and the typed enqueue accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// The job's id.
    pub job_id: Uuid,
    /// The registered kind (`webhook.deliver`, `noop`, …).
    pub kind: String,
    /// The handler's arguments.
    pub args: serde_json::Value,
    /// Not before (None: at once).
    pub run_at: Option<DateTime<Utc>>,
    /// Higher runs first.
    pub priority: i16,
    /// Attempts before the job is dead.
    pub max_attempts: i32,
    /// The same key returns the same job while it exists.
    pub idempotency_key: Option<String>,
}

/// Why a job request or an operator's command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The kind is not a dotted lower-case name.
    #[error("kind must be a lower-case name such as 'webhook.deliver' (letters, digits, '.', '_', '-'; at most 100)")]
    BadKind,
    /// `args` is not a JSON object or is too large.
    #[error("args must be a JSON object of at most 65536 bytes")]
    BadArgs,
    /// `max_attempts` out of range.
    #[error("max_attempts must be between 1 and 1000")]
    BadMaxAttempts,
    /// `priority` out of range.
    #[error("priority must be between -100 and 100")]
    BadPriority,
    /// The idempotency key is empty or too long.
    #[error("idempotency_key must have 1 to 200 characters")]
    BadIdempotencyKey,
    /// This id was enqueued already.
    #[error("job already enqueued")]
    AlreadyEnqueued,
}

impl JobRequest {
    /// Checks a request; `max_attempts` defaults to [`DEFAULT_MAX_ATTEMPTS`], `priority` to 0.
    ///
    /// # Errors
    /// The first field that is out of bounds.
    pub fn new(
        job_id: Uuid,
        kind: &str,
        args: serde_json::Value,
        run_at: Option<DateTime<Utc>>,
        priority: Option<i16>,
        max_attempts: Option<i32>,
        idempotency_key: Option<String>,
    ) -> Result<Self, JobError> {
        if !valid_kind(kind) {
            return Err(JobError::BadKind);
        }
        if !args.is_object() || serde_json::to_vec(&args).map_or(true, |b| b.len() > ARGS_MAX_BYTES) {
            return Err(JobError::BadArgs);
        }
        let max_attempts = max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
            return Err(JobError::BadMaxAttempts);
        }
        let priority = priority.unwrap_or(0);
        if !PRIORITY_RANGE.contains(&priority) {
            return Err(JobError::BadPriority);
        }
        if idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.chars().count() > IDEMPOTENCY_KEY_MAX) {
            return Err(JobError::BadIdempotencyKey);
        }
        Ok(Self { job_id, kind: kind.to_owned(), args, run_at, priority, max_attempts, idempotency_key })
    }
}

/// A kind name: lower-case letters, digits, `.`, `_` and `-`, starting with a letter, at most 100.
#[must_use]
pub fn valid_kind(kind: &str) -> bool {
    let mut chars = kind.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && kind.len() <= 100
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// What can be done to a job through the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobCommand {
    /// Ask for a job (over the API).
    Enqueue(JobRequest),
    /// An operator runs a dead or failed job again.
    Retry {
        /// The job.
        job_id: Uuid,
    },
    /// An operator cancels a job that has not started.
    Cancel {
        /// The job.
        job_id: Uuid,
    },
    /// A run ended.
    Finish {
        /// The job.
        job_id: Uuid,
        /// Its kind.
        kind: String,
        /// How it ended.
        outcome: JobOutcome,
        /// Attempts made.
        attempts: i32,
        /// When it ended.
        finished_at: DateTime<Utc>,
    },
}

/// What happened to a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobEvent {
    /// Asked for over the API (the metadata names who asked).
    JobEnqueued(JobRequest),
    /// An operator ran a dead or failed job again.
    JobRetried {
        /// The job.
        job_id: Uuid,
    },
    /// An operator cancelled a job that had not started.
    JobCancelled {
        /// The job.
        job_id: Uuid,
    },
    /// A run ended: done, failed for good, or dead after its last attempt.
    JobFinished {
        /// The job.
        job_id: Uuid,
        /// Its kind.
        kind: String,
        /// How it ended.
        outcome: JobOutcome,
        /// Attempts made.
        attempts: i32,
        /// When it ended.
        finished_at: DateTime<Utc>,
    },
}

impl DomainEvent for JobEvent {
    fn event_type(&self) -> String {
        match self {
            Self::JobEnqueued(_) => "JobEnqueued",
            Self::JobRetried { .. } => "JobRetried",
            Self::JobCancelled { .. } => "JobCancelled",
            Self::JobFinished { .. } => "JobFinished",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// What the log knows of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Asked for over the API.
    pub enqueued: bool,
    /// Runs that ended.
    pub finished: u32,
    /// Cancelled by an operator (and not retried since).
    pub cancelled: bool,
}

impl Aggregate for Job {
    const TYPE: &'static str = "Job";
    type Command = JobCommand;
    type Event = JobEvent;
    type Error = JobError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            JobCommand::Enqueue(request) => {
                if self.enqueued || self.finished > 0 {
                    return Err(JobError::AlreadyEnqueued);
                }
                let request = JobRequest::new(
                    request.job_id,
                    &request.kind,
                    request.args,
                    request.run_at,
                    Some(request.priority),
                    Some(request.max_attempts),
                    request.idempotency_key,
                )?;
                JobEvent::JobEnqueued(request)
            }
            JobCommand::Retry { job_id } => JobEvent::JobRetried { job_id },
            JobCommand::Cancel { job_id } => JobEvent::JobCancelled { job_id },
            JobCommand::Finish { job_id, kind, outcome, attempts, finished_at } => {
                JobEvent::JobFinished { job_id, kind, outcome, attempts, finished_at }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            JobEvent::JobEnqueued(_) => self.enqueued = true,
            JobEvent::JobRetried { .. } => self.cancelled = false,
            JobEvent::JobCancelled { .. } => self.cancelled = true,
            JobEvent::JobFinished { .. } => self.finished += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type JobTest = TestFramework<Job>;

    fn id() -> Uuid {
        Uuid::from_u128(12)
    }

    fn request() -> JobRequest {
        JobRequest::new(id(), "noop", serde_json::json!({}), None, None, None, Some("key-1".into()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_request_gets_the_defaults_and_each_bound_is_checked() {
        let r = request();
        assert_eq!((r.priority, r.max_attempts), (0, DEFAULT_MAX_ATTEMPTS));
        let new = |kind: &str, args, priority, attempts, key| {
            JobRequest::new(id(), kind, args, None, priority, attempts, key)
        };
        let obj = serde_json::json!({});
        assert_eq!(new("Bad Kind", obj.clone(), None, None, None).err(), Some(JobError::BadKind));
        assert_eq!(new("noop", serde_json::json!([1]), None, None, None).err(), Some(JobError::BadArgs));
        let huge = serde_json::json!({ "x": "a".repeat(ARGS_MAX_BYTES) });
        assert_eq!(new("noop", huge, None, None, None).err(), Some(JobError::BadArgs));
        assert_eq!(new("noop", obj.clone(), Some(101), None, None).err(), Some(JobError::BadPriority));
        assert_eq!(new("noop", obj.clone(), Some(-101), None, None).err(), Some(JobError::BadPriority));
        assert_eq!(new("noop", obj.clone(), None, Some(0), None).err(), Some(JobError::BadMaxAttempts));
        assert_eq!(new("noop", obj.clone(), None, Some(1001), None).err(), Some(JobError::BadMaxAttempts));
        assert_eq!(new("noop", obj.clone(), None, None, Some(String::new())).err(), Some(JobError::BadIdempotencyKey));
        assert_eq!(
            new("noop", obj.clone(), None, None, Some("k".repeat(201))).err(),
            Some(JobError::BadIdempotencyKey)
        );
        assert!(new("webhook.deliver", obj, Some(100), Some(1000), Some("k".repeat(200))).is_ok());
    }

    #[test]
    fn an_enqueue_is_recorded_once() {
        JobTest::with(())
            .given_no_previous_events()
            .when(JobCommand::Enqueue(request()))
            .then_expect_events(vec![JobEvent::JobEnqueued(request())]);
        JobTest::with(())
            .given(vec![JobEvent::JobEnqueued(request())])
            .when(JobCommand::Enqueue(request()))
            .then_expect_error(JobError::AlreadyEnqueued);
    }

    #[test]
    fn an_enqueue_out_of_bounds_is_refused_by_the_aggregate_too() {
        let mut bad = request();
        bad.priority = 500;
        JobTest::with(())
            .given_no_previous_events()
            .when(JobCommand::Enqueue(bad))
            .then_expect_error(JobError::BadPriority);
    }

    #[test]
    fn operators_retry_and_cancel_and_runs_finish() {
        JobTest::with(())
            .given(vec![JobEvent::JobEnqueued(request())])
            .when(JobCommand::Cancel { job_id: id() })
            .then_expect_events(vec![JobEvent::JobCancelled { job_id: id() }]);
        let finished = JobEvent::JobFinished {
            job_id: id(),
            kind: "noop".into(),
            outcome: JobOutcome::Dead,
            attempts: 25,
            finished_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
        };
        // A job enqueued from code has no JobEnqueued: its first event can be its end.
        JobTest::with(())
            .given(vec![finished.clone()])
            .when(JobCommand::Retry { job_id: id() })
            .then_expect_events(vec![JobEvent::JobRetried { job_id: id() }]);
        JobTest::with(())
            .given_no_previous_events()
            .when(JobCommand::Finish {
                job_id: id(),
                kind: "noop".into(),
                outcome: JobOutcome::Dead,
                attempts: 25,
                finished_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
            })
            .then_expect_events(vec![finished]);
    }

    #[test]
    fn the_state_follows_the_events() {
        let mut job = Job::default();
        job.apply(JobEvent::JobEnqueued(request()));
        job.apply(JobEvent::JobCancelled { job_id: id() });
        assert!(job.enqueued && job.cancelled);
        job.apply(JobEvent::JobRetried { job_id: id() });
        assert!(!job.cancelled);
        assert_eq!(JobEvent::JobRetried { job_id: id() }.event_type(), "JobRetried");
        assert_eq!(JobOutcome::Failed.as_str(), "failed");
    }
}
