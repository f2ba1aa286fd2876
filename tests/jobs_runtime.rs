//! The job runner in one process, with handlers of the test's own: retries and their backoff
//! (timed with the test clock), dead letters, permanent errors, "retry after", timeouts, and
//! fencing (an outcome under a lease that was taken away is refused).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_platform::clock::Clock;
use cairn_platform::jobs::{enqueue, NewJob};
use cairn_workers::jobs::{JobContext, JobError, JobHandler, Registry};
use chrono::{DateTime, Utc};
use common::{TestApp, TestEnv};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use uuid::Uuid;

/// Fails `args.fail_times` times (a retryable error), then succeeds.
#[derive(Clone, Default)]
struct Flaky {
    runs: Arc<AtomicUsize>,
}

impl JobHandler for Flaky {
    fn kind(&self) -> &'static str {
        "test.flaky"
    }

    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let fail_times = job.args["fail_times"].as_i64().unwrap_or(0);
            if i64::from(job.attempt) <= fail_times {
                return Err(JobError::Retry(anyhow::anyhow!("boom on attempt {}", job.attempt)));
            }
            Ok(())
        })
    }
}

/// Always a permanent error.
struct Permanent;

impl JobHandler for Permanent {
    fn kind(&self) -> &'static str {
        "test.permanent"
    }

    fn run<'a>(&'a self, _job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async { Err(JobError::Permanent(anyhow::anyhow!("the input can never work"))) })
    }
}

/// Asks to be retried after `args.secs` seconds.
struct Later;

impl JobHandler for Later {
    fn kind(&self) -> &'static str {
        "test.later"
    }

    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            let secs = job.args["secs"].as_u64().unwrap_or(1);
            Err(JobError::RetryAfter(Duration::from_secs(secs), anyhow::anyhow!("busy, come back in {secs} s")))
        })
    }
}

/// Sleeps far longer than its kind's timeout (1 s in these tests).
struct Slow;

impl JobHandler for Slow {
    fn kind(&self) -> &'static str {
        "test.slow"
    }

    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            tokio::select! {
                () = job.cancel.cancelled() => Err(JobError::Retry(anyhow::anyhow!("cancelled"))),
                () = tokio::time::sleep(Duration::from_secs(600)) => Ok(()),
            }
        })
    }
}

/// Waits for the test to open its gate, then succeeds.
#[derive(Clone)]
struct Gated {
    gate: Arc<Semaphore>,
    started: Arc<AtomicUsize>,
}

impl JobHandler for Gated {
    fn kind(&self) -> &'static str {
        "test.gated"
    }

    fn run<'a>(&'a self, _job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            self.started.fetch_add(1, Ordering::SeqCst);
            let _permit = self.gate.acquire().await.map_err(|e| JobError::Retry(e.into()))?;
            Ok(())
        })
    }
}

struct Harness {
    app: TestApp,
    flaky: Flaky,
    gated: Gated,
}

/// Backoff base 60 s: a retry is never due before the test moves the clock.
async fn spawn() -> Harness {
    let flaky = Flaky::default();
    let gated = Gated { gate: Arc::new(Semaphore::new(0)), started: Arc::new(AtomicUsize::new(0)) };
    let registry = Registry::new().with(flaky.clone()).with(Permanent).with(Later).with(Slow).with(gated.clone());
    let settings = [
        ("CAIRN_JOBS_POLL_MS", "50"),
        ("CAIRN_JOBS_BACKOFF_BASE_SECS", "60"),
        ("CAIRN_JOBS_BACKOFF_MAX_SECS", "3600"),
        ("CAIRN_JOBS_TIMEOUT_SECS", "test.slow=1"),
    ];
    let app = TestApp::spawn_with_jobs(TestEnv::new(), &settings, registry).await;
    Harness { app, flaky, gated }
}

async fn enqueue_job(app: &TestApp, job: NewJob) -> Uuid {
    let mut conn = app.pool.acquire().await.unwrap();
    enqueue(&mut conn, &job, app.clock.now()).await.unwrap().id
}

fn job(kind: &str, args: Value, max_attempts: i32) -> NewJob {
    let mut job = NewJob::new(kind, args);
    job.max_attempts = max_attempts;
    job
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    status: String,
    attempts: i32,
    run_at: DateTime<Utc>,
    errors: Value,
    last_error: Option<String>,
    fence: i64,
}

async fn row(app: &TestApp, id: Uuid) -> Row {
    sqlx::query_as("SELECT status, attempts, run_at, errors, last_error, fence FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Polls the job until `what` holds of it, failing after 20 s.
async fn wait_job(app: &TestApp, id: Uuid, what: &str, check: impl Fn(&Row) -> bool) -> Row {
    let started = std::time::Instant::now();
    loop {
        let row = row(app, id).await;
        if check(&row) {
            return row;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "job {id}: {what} never held; last {row:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `JobFinished` events of `id` (their payloads).
async fn finished(app: &TestApp, id: Uuid) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = 'Job' AND aggregate_id = $1 AND event_type = 'JobFinished' \
         ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

fn error_at(row: &Row, i: usize) -> DateTime<Utc> {
    row.errors[i]["at"].as_str().unwrap().parse().unwrap()
}

/// A noop job enqueued and done: the runner was claiming while something else had to wait.
async fn runner_is_claiming(app: &TestApp) {
    let id = enqueue_job(app, NewJob::new("noop", json!({}))).await;
    wait_job(app, id, "the noop job is done", |r| r.status == "done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_job_waits_its_jittered_backoff_and_runs_again_when_the_clock_passes_it() {
    let Harness { app, flaky, .. } = spawn().await;
    let id = enqueue_job(&app, job("test.flaky", json!({ "fail_times": 2 }), 5)).await;

    // The first attempt fails: scheduled again within the first backoff (at most 60 s).
    let first = wait_job(&app, id, "first failure recorded", |r| r.status == "scheduled" && r.attempts == 1).await;
    let failed_at = error_at(&first, 0);
    let wait = first.run_at - failed_at;
    assert!(wait >= chrono::Duration::zero() && wait <= chrono::Duration::seconds(60), "backoff {wait}");
    assert_eq!(first.errors[0]["attempt"], 1);
    assert_eq!(first.errors[0]["error"], "boom on attempt 1");
    assert_eq!(first.last_error.as_deref(), Some("boom on attempt 1"));

    // It is not run again while its run_at is ahead, though the runner keeps claiming.
    runner_is_claiming(&app).await;
    assert_eq!(flaky.runs.load(Ordering::SeqCst), 1);
    assert_eq!(row(&app, id).await.status, "scheduled");

    // Past its run_at it runs again, fails again: the second backoff is at most 120 s.
    let ahead = (first.run_at - app.clock.now()).to_std().unwrap_or_default();
    app.clock.advance(ahead + Duration::from_secs(1));
    let second = wait_job(&app, id, "second failure recorded", |r| r.status == "scheduled" && r.attempts == 2).await;
    let wait = second.run_at - error_at(&second, 1);
    assert!(wait >= chrono::Duration::zero() && wait <= chrono::Duration::seconds(120), "backoff {wait}");
    assert_eq!(flaky.runs.load(Ordering::SeqCst), 2);

    // The third attempt succeeds: done, both errors kept, one JobFinished.
    let ahead = (second.run_at - app.clock.now()).to_std().unwrap_or_default();
    app.clock.advance(ahead + Duration::from_secs(1));
    let done = wait_job(&app, id, "done", |r| r.status == "done").await;
    assert_eq!(done.attempts, 3);
    assert_eq!(done.errors.as_array().unwrap().len(), 2);
    let events = finished(&app, id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["JobFinished"]["outcome"], "done");
    assert_eq!(events[0]["JobFinished"]["attempts"], 3);
    assert_eq!(flaky.runs.load(Ordering::SeqCst), 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_fails_every_attempt_is_dead_with_every_error_listed() {
    let Harness { app, flaky, .. } = spawn().await;
    let id = enqueue_job(&app, job("test.flaky", json!({ "fail_times": 1000 }), 3)).await;
    for attempt in 1..=2 {
        let row = wait_job(&app, id, "a failure recorded", |r| r.status == "scheduled" && r.attempts == attempt).await;
        let ahead = (row.run_at - app.clock.now()).to_std().unwrap_or_default();
        app.clock.advance(ahead + Duration::from_secs(1));
    }
    let dead = wait_job(&app, id, "dead", |r| r.status == "dead").await;
    assert_eq!(dead.attempts, 3);
    let errors = dead.errors.as_array().unwrap();
    assert_eq!(errors.len(), 3, "{errors:?}");
    for (i, error) in errors.iter().enumerate() {
        assert_eq!(error["attempt"], i + 1);
        assert_eq!(error["error"], format!("boom on attempt {}", i + 1));
    }
    assert_eq!(dead.last_error.as_deref(), Some("boom on attempt 3"));
    let events = finished(&app, id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["JobFinished"]["outcome"], "dead");
    assert_eq!(events[0]["JobFinished"]["attempts"], 3);

    // A dead job stays dead: however far time moves, it is not run again.
    app.clock.advance(Duration::from_secs(24 * 3600));
    runner_is_claiming(&app).await;
    assert_eq!(flaky.runs.load(Ordering::SeqCst), 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permanent_error_fails_the_job_after_one_attempt() {
    let Harness { app, .. } = spawn().await;
    let id = enqueue_job(&app, job("test.permanent", json!({}), 25)).await;
    let failed = wait_job(&app, id, "failed", |r| r.status == "failed").await;
    assert_eq!(failed.attempts, 1);
    assert_eq!(failed.errors.as_array().unwrap().len(), 1);
    assert_eq!(failed.last_error.as_deref(), Some("the input can never work"));
    let events = finished(&app, id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["JobFinished"]["outcome"], "failed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_schedules_the_next_attempt_exactly_that_far_ahead() {
    let Harness { app, .. } = spawn().await;
    let id = enqueue_job(&app, job("test.later", json!({ "secs": 7 }), 2)).await;
    let first = wait_job(&app, id, "retry scheduled", |r| r.status == "scheduled" && r.attempts == 1).await;
    let wait = first.run_at - error_at(&first, 0);
    assert_eq!(wait.num_milliseconds(), 7000, "{wait}");
    assert_eq!(first.last_error.as_deref(), Some("busy, come back in 7 s"));
    assert!(finished(&app, id).await.is_empty());

    // Its last attempt asking again is dead: max_attempts holds for RetryAfter too.
    runner_is_claiming(&app).await;
    assert_eq!(row(&app, id).await.attempts, 1);
    app.clock.advance(Duration::from_secs(8));
    let dead = wait_job(&app, id, "dead", |r| r.status == "dead").await;
    assert_eq!(dead.attempts, 2);
    assert_eq!(finished(&app, id).await.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attempt_past_its_timeout_is_stopped_and_retried() {
    let Harness { app, .. } = spawn().await;
    let id = enqueue_job(&app, job("test.slow", json!({}), 5)).await;
    wait_job(&app, id, "running", |r| r.status == "running").await;
    let retried = wait_job(&app, id, "retry scheduled", |r| r.status == "scheduled").await;
    assert_eq!(retried.attempts, 1);
    assert_eq!(retried.last_error.as_deref(), Some("timed out after 1 s"));
    assert!(finished(&app, id).await.is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcome_under_a_lease_that_was_taken_away_is_refused() {
    let Harness { app, gated, .. } = spawn().await;
    let id = enqueue_job(&app, job("test.gated", json!({}), 5)).await;
    let running = wait_job(&app, id, "running", |r| r.status == "running").await;
    common::wait_until("the handler started", Duration::from_secs(10), || gated.started.load(Ordering::SeqCst) == 1)
        .await;

    // Another claim took the lease meanwhile (as one does after the lease ran out).
    let taken = running.fence + 1;
    sqlx::query("UPDATE jobs SET fence = $2, lease_owner = 'another' WHERE id = $1")
        .bind(id)
        .bind(taken)
        .execute(&app.pool)
        .await
        .unwrap();

    // The first run ends: its outcome is refused, and counted.
    let stale_before = stale_outcomes(&app).await;
    gated.gate.add_permits(1);
    let started = std::time::Instant::now();
    while stale_outcomes(&app).await <= stale_before {
        assert!(started.elapsed() < Duration::from_secs(20), "no stale outcome counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = row(&app, id).await;
    assert_eq!((row.status.as_str(), row.fence), ("running", taken), "the row keeps the new lease's state");
    assert!(finished(&app, id).await.is_empty());
    let owner: Option<String> =
        sqlx::query_scalar("SELECT lease_owner FROM jobs WHERE id = $1").bind(id).fetch_one(&app.pool).await.unwrap();
    assert_eq!(owner.as_deref(), Some("another"));
    app.stop().await;
}

/// `cairn_jobs_stale_outcomes_total` as `/metrics` shows it (0 before the first).
async fn stale_outcomes(app: &TestApp) -> f64 {
    let text = app.client.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with("cairn_jobs_stale_outcomes_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metrics_show_jobs_by_kind_and_status_and_the_wait_before_start() {
    let Harness { app, .. } = spawn().await;
    let id = enqueue_job(&app, job("test.permanent", json!({}), 25)).await;
    wait_job(&app, id, "failed", |r| r.status == "failed").await;
    let started = std::time::Instant::now();
    loop {
        let text = app.client.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
        let failed_gauge = text
            .lines()
            .any(|l| l.starts_with("cairn_jobs{") && l.contains("kind=\"test.permanent\"") && l.contains("status=\"failed\"") && !l.ends_with(" 0"));
        if failed_gauge {
            assert!(text.contains("cairn_jobs_wait_seconds"), "{text}");
            assert!(text.contains("cairn_jobs_run_seconds"), "{text}");
            assert!(text.contains("cairn_jobs_started_total{kind=\"test.permanent\"}"), "{text}");
            assert!(
                text.lines().any(|l| l.starts_with("cairn_jobs_finished_total")
                    && l.contains("kind=\"test.permanent\"")
                    && l.contains("outcome=\"failed\"")),
                "{text}"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no failed gauge for test.permanent: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}
